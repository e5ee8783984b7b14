//! Unit tests of the volume store on a temporary directory.
use super::*;

fn spec(id: &str, cap: u64) -> VolumeSpec {
    VolumeSpec {
        id: id.into(),
        capacity_bytes: cap,
        queues: 1,
        fs_type: None,
        parameters: BTreeMap::new(),
        source: None,
        ephemeral: false,
    }
}

#[test]
fn hostile_ids_are_rejected() {
    for bad in ["", "..", ".", "../x", "/abs", "a/b", ".hidden", "a b", &"x".repeat(129), "-lead"] {
        assert!(validate_id("volume ID", bad).is_err(), "{bad:?}");
    }
    for good in ["pvc-1234", "a", "A.b_c-9", &"x".repeat(128)] {
        assert!(validate_id("volume ID", good).is_ok(), "{good:?}");
    }
}

#[test]
fn create_is_idempotent_and_conflicts_are_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = VolumeStore::open(dir.path()).expect("store");
    let (a, created) = store.create_volume(&spec("v1", 1 << 20)).expect("create");
    assert!(created);
    let (b, created) = store.create_volume(&spec("v1", 1 << 20)).expect("repeat");
    assert!(!created);
    assert_eq!(a, b);
    assert!(matches!(store.create_volume(&spec("v1", 2 << 20)), Err(Error::Conflict { .. })));
    assert_eq!(store.volumes().expect("list").len(), 1);
    assert!(store.delete_volume("v1").expect("delete"));
    assert!(!store.delete_volume("v1").expect("delete again"));
}

#[test]
fn leftovers_of_interrupted_creates_are_removed_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = VolumeStore::open(dir.path()).expect("store");
    store.create_volume(&spec("kept", 1 << 20)).expect("create");
    for sub in ["volumes", "snapshots"] {
        fs::create_dir_all(dir.path().join(sub).join(".new-half")).expect("leftover");
        fs::write(dir.path().join(sub).join(".new-half").join(IMAGE), b"x").expect("leftover image");
    }
    let store = VolumeStore::open(dir.path()).expect("reopen");
    for sub in ["volumes", "snapshots"] {
        assert!(!dir.path().join(sub).join(".new-half").exists(), "{sub}");
    }
    assert_eq!(store.volumes().expect("list").len(), 1);
}

#[test]
fn freeze_records_survive_until_cleared() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = VolumeStore::open(dir.path()).expect("store");
    assert!(store.recorded_freezes().expect("none").is_empty());
    store.record_freeze("v1", Path::new("/staging/v1")).expect("record");
    store.record_freeze("v2", Path::new("/staging/v2")).expect("record");
    let mut frozen = VolumeStore::open(dir.path()).expect("reopen").recorded_freezes().expect("list");
    frozen.sort();
    assert_eq!(frozen, [("v1".into(), PathBuf::from("/staging/v1")), ("v2".into(), PathBuf::from("/staging/v2"))]);
    store.clear_freeze("v1").expect("clear");
    store.clear_freeze("v1").expect("clear twice");
    assert_eq!(store.recorded_freezes().expect("list").len(), 1);
    assert!(store.record_freeze("../x", Path::new("/")).is_err());
}

#[test]
fn snapshots_and_clones_copy_the_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = VolumeStore::open(dir.path()).expect("store");
    store.create_volume(&spec("src", 1 << 20)).expect("create");
    fs::write(store.image_path("src").expect("path"), vec![7u8; 1 << 20]).expect("fill");
    let (snap, _) = store.create_snapshot("s1", "src").expect("snapshot");
    assert_eq!(snap.size_bytes, 1 << 20);
    assert!(matches!(store.create_snapshot("s1", "other"), Err(Error::Conflict { .. })));
    let mut clone = spec("c1", 2 << 20);
    clone.source = Some(ContentSource::Snapshot("s1".into()));
    store.create_volume(&clone).expect("restore");
    let data = fs::read(store.image_path("c1").expect("path")).expect("read");
    assert_eq!(data.len(), 2 << 20);
    assert!(data[..1 << 20].iter().all(|b| *b == 7) && data[1 << 20..].iter().all(|b| *b == 0));
    let mut missing = spec("c2", 1 << 20);
    missing.source = Some(ContentSource::Volume("nope".into()));
    assert!(matches!(store.create_volume(&missing), Err(Error::NotFound { .. })));
}
