//! The verdicts of a script run in the VDUSE guest: it writes `RESULT name PASS|FAIL` lines to
//! `OUT/results` and each scenario's log to `OUT/name.log`; every #[test] of the host binary
//! checks its own scenario. Shared by tests/guest.rs and tests/kubelet_e2e.rs.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// One run's verdicts by scenario name.
pub struct Verdicts {
    pub out: PathBuf,
    pub by_name: HashMap<String, bool>,
}

/// Runs `command`, which leaves its results in `out`, and reads the verdicts.
pub fn collect(mut command: Command, out: &Path) -> Result<Verdicts, String> {
    let status = command.status().map_err(|e| format!("cannot run {command:?}: {e}"))?;
    let results = std::fs::read_to_string(out.join("results")).map_err(|e| {
        format!("the guest produced no results ({e}); the run exited with {status}; see {}", out.display())
    })?;
    let by_name = results
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some("RESULT")).then_some(())?;
            Some((f.next()?.to_owned(), f.next()? == "PASS"))
        })
        .collect();
    Ok(Verdicts { out: out.to_owned(), by_name })
}

/// Panics unless scenario `name` passed, with the end of its log.
pub fn check(run: &Result<Verdicts, String>, name: &str) {
    let run = match run {
        Ok(run) => run,
        Err(e) => panic!("guest run failed: {e}"),
    };
    match run.by_name.get(name) {
        Some(true) => {}
        Some(false) => {
            let log = run.out.join(format!("{name}.log"));
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            panic!("guest scenario {name} failed ({}):\n{}", log.display(), tail.join("\n"));
        }
        None => panic!("guest scenario {name} did not run; see {}", run.out.display()),
    }
}

/// Panics if the run reported a scenario that `known` lacks (it would run unseen).
pub fn all_known(run: &Result<Verdicts, String>, known: &[&str]) {
    let run = run.as_ref().expect("guest run");
    for name in run.by_name.keys() {
        assert!(known.contains(&name.as_str()), "guest scenario {name} has no #[test]");
    }
}
