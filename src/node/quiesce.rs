//! Holding a volume still while it is copied (snapshots and clones), so that the copy is one
//! point in time.

use std::time::Duration;

use super::NodeAgent;
use crate::host;
use crate::status::{Error, Result};
use crate::volume::VolumeMeta;

/// A volume held still while it is copied, so the copy is one point in time: a staged
/// filesystem is frozen (which flushes it and holds its writers) and its image flushed; a
/// staged block volume's queues are held (no request taken off a ring, none in flight) and
/// its image flushed. The freeze is recorded first, so a plugin killed before it thaws thaws
/// it when it starts again. Both happen only on a device that is served and healthy (a
/// freeze on a device nobody answers would never return): otherwise UNAVAILABLE. Released
/// when dropped. The caller holds the volume's guard for as long as this lives, which keeps
/// the heal loop's thaw away from this freeze.
pub struct Quiesced<'a> {
    agent: &'a NodeAgent,
    volume_id: String,
    freeze: Option<host::Freeze>,
    _hold: Option<crate::server::Hold>,
}

/// Longest wait for a block volume's in-flight requests before a snapshot gives up.
const HOLD_TIMEOUT: Duration = Duration::from_secs(30);

impl NodeAgent {
    /// Holds a volume still for a copy (see [`Quiesced`]). The caller holds its guard.
    pub fn quiesce(&self, meta: &VolumeMeta) -> Result<Quiesced<'_>> {
        let volume_id = meta.spec.id.clone();
        let mut quiet = Quiesced { agent: self, volume_id, freeze: None, _hold: None };
        let Some(stage) = &meta.staged else { return Ok(quiet) };
        let server = self.served_or_unavailable(meta)?;
        if stage.block {
            quiet._hold = Some(server.hold(HOLD_TIMEOUT).map_err(|e| Error::Unavailable(e.to_string()))?);
        } else {
            self.store.record_freeze(&quiet.volume_id, &stage.staging_path)?;
            // On failure `quiet` drops and clears the record.
            quiet.freeze = Some(host::Freeze::new(&stage.staging_path)?);
            server.flush()?;
        }
        Ok(quiet)
    }
}

impl Drop for Quiesced<'_> {
    fn drop(&mut self) {
        // Thawed first (Freeze's drop), then forgotten; a failed thaw keeps its record for
        // the heal loop.
        if let Some(freeze) = self.freeze.take() {
            if let Err(e) = freeze.thaw() {
                tracing::error!(volume = %self.volume_id, error = %e, "cannot thaw the filesystem; the heal loop retries");
                return;
            }
        }
        if let Err(e) = self.agent.store.clear_freeze(&self.volume_id) {
            tracing::warn!(volume = %self.volume_id, error = %e, "cannot remove the freeze record");
        }
    }
}
