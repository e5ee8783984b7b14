//! `bench/plot.py` (behind `bench/run.sh --plot`) draws a benchmark table as a PNG.

use std::process::Command;

#[test]
fn the_benchmark_picture_is_drawn_from_the_raw_figures() {
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("bench.raw");
    let mut lines = String::new();
    for round in 0..3u32 {
        for group in ["tmpfs/q1", "ext4/q2"] {
            // Ours leads on tmpfs and trails on ext4, most of all at QD32 (8010 against rublk's 12010).
            let ours = if group == "tmpfs/q1" { 2000 } else { 1000 };
            for (config, base) in
                [("vduse-csi", ours), ("qsd", 1000), ("qsd+iothread", 1200), ("rublk", 1500), ("loop", 4000)]
            {
                for (job, scale) in [("randread-4k-qd1", 1), ("randread-4k-qd32", 8), ("read-1m-qd8", 0)] {
                    let iops = if scale == 0 { base / 5 } else { base * scale } + round * 10;
                    lines.push_str(&format!("{config}/{group} {job} {iops} {}\n", iops / 256));
                }
            }
        }
        lines.push_str(&format!("vduse-metrics/tmpfs/q1 randread-4k-qd1 {} 7\n", 1990 + round));
    }
    std::fs::write(&raw, lines).expect("raw figures");
    let png = dir.path().join("bench.png");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/plot.py");
    let out = Command::new(script).arg(&raw).arg(&png).output().expect("run bench/plot.py");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&png).expect("the picture");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert!(bytes.len() > 10_000, "a picture of {} bytes has no bars in it", bytes.len());
    // The worst row against the best server (the loop device is no server), said in words too.
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("worst row: 0.67x, randread-4k-qd32 on ext4, 2 queue(s), vs rublk"), "{said}");

    // Without any row of ours there is nothing to draw: it says so and fails.
    std::fs::write(&raw, "qsd/tmpfs/q1 randread-4k-qd1 100 1\n").expect("raw figures");
    let out = Command::new(script).arg(&raw).arg(&png).output().expect("run bench/plot.py");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no vduse-csi rows"));
}
