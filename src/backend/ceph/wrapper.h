/* What bindgen reads for src/backend/rbd/sys.rs: Debian's librados-dev and librbd-dev. */
#include <rados/librados.h>
#include <rbd/librbd.h>
#include <rbd/features.h>
