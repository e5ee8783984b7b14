//! Paging tokens of ListVolumes and ListSnapshots: opaque to the caller and checkable by us.
//!
//! A token names the last entry of the page it ends, sealed with a keyed hash whose key is
//! drawn at random when the plugin starts. A string we did not issue (a bare volume ID, a
//! token edited by hand, one from an earlier run of the plugin) fails the check, and the call
//! answers ABORTED, as the CSI spec asks; the caller then lists again from the start.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::OnceLock;

/// Separates the entry ID from the seal; never part of an ID.
const SEPARATOR: char = '~';

fn key() -> &'static RandomState {
    static KEY: OnceLock<RandomState> = OnceLock::new();
    KEY.get_or_init(RandomState::new)
}

fn seal(id: &str) -> u64 {
    key().hash_one(id)
}

/// The token of a page that ends with the entry `last_id`.
pub fn issue(last_id: &str) -> String {
    format!("{last_id}{SEPARATOR}{:016x}", seal(last_id))
}

/// The entry ID a token we issued names; `None` for any other string.
pub fn check(token: &str) -> Option<&str> {
    let (id, mac) = token.rsplit_once(SEPARATOR)?;
    let mac = u64::from_str_radix(mac, 16).ok().filter(|_| mac.len() == 16)?;
    (mac == seal(id)).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_issued_tokens_pass() {
        let token = issue("pvc-2");
        assert_eq!(check(&token), Some("pvc-2"));
        for forged in ["pvc-2", "", "~", "pvc-2~0000000000000000", "pvc-3~0", &token.replace("pvc-2", "pvc-3")] {
            assert_eq!(check(forged), None, "{forged:?}");
        }
    }
}
