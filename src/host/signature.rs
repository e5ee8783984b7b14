//! What low-level probing (`blkid -p -o export`) found on a device, and the one rule that
//! decides whether it may be formatted: only when nothing at all was found.

/// The contents of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Contents {
    /// No signature: the only state in which a device is ever formatted.
    Blank,
    /// A filesystem of this type (blkid's `USAGE=filesystem`), mountable as it is.
    Filesystem(String),
    /// Anything else: what it is, for the error that refuses to touch it.
    Other(String),
}

/// Parses `blkid -p -o export` output (`KEY=value` lines). A partition table wins over
/// everything: a disk with one may carry a filesystem signature in its first partition's
/// place too, and mounting or formatting the whole disk would destroy the table.
pub fn parse_blkid_export(text: &str) -> Contents {
    let value = |key: &str| {
        text.lines()
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    if let Some(table) = value("PTTYPE") {
        return Contents::Other(format!("a {table} partition table"));
    }
    match (value("TYPE"), value("USAGE")) {
        (Some(fs), Some(usage)) if usage == "filesystem" => Contents::Filesystem(fs),
        (Some(fs), None) => Contents::Filesystem(fs),
        (Some(what), Some(usage)) => Contents::Other(format!("a {what} signature ({usage})")),
        (None, _) if text.trim().is_empty() => Contents::Blank,
        // Exit 0 with keys but no TYPE: some signature blkid could not name. Never blank.
        (None, _) => Contents::Other(format!("an unnamed signature ({})", text.trim().replace('\n', ", "))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_table_is_never_blank() {
        // What blkid -p prints for a disk that sfdisk gave a GPT and nothing else.
        let gpt = "DEVNAME=/dev/vdb\nPTUUID=4f2d0c3e-1b7a-4c1e-9d35-0e0c1f9b2a11\nPTTYPE=gpt\n";
        assert_eq!(parse_blkid_export(gpt), Contents::Other("a gpt partition table".into()));
        let dos = "DEVNAME=/dev/vdb\nPTUUID=1234abcd\nPTTYPE=dos\n";
        assert_eq!(parse_blkid_export(dos), Contents::Other("a dos partition table".into()));
        // A protective MBR's filesystem-looking leftovers do not make it mountable.
        let both = "DEVNAME=/dev/vdb\nTYPE=vfat\nUSAGE=filesystem\nPTTYPE=dos\n";
        assert!(matches!(parse_blkid_export(both), Contents::Other(_)));
    }

    #[test]
    fn filesystems_and_other_signatures_are_told_apart() {
        let ext4 = "DEVNAME=/dev/vdb\nUUID=0a1b\nVERSION=1.0\nBLOCK_SIZE=4096\nTYPE=ext4\nUSAGE=filesystem\n";
        assert_eq!(parse_blkid_export(ext4), Contents::Filesystem("ext4".into()));
        let lvm = "DEVNAME=/dev/vdb\nUUID=x\nVERSION=LVM2 001\nTYPE=LVM2_member\nUSAGE=raid\n";
        assert_eq!(parse_blkid_export(lvm), Contents::Other("a LVM2_member signature (raid)".into()));
        let luks = "DEVNAME=/dev/vdb\nTYPE=crypto_LUKS\nUSAGE=crypto\n";
        assert!(matches!(parse_blkid_export(luks), Contents::Other(_)));
        assert!(matches!(parse_blkid_export("DEVNAME=/dev/vdb\nSBMAGIC=x\n"), Contents::Other(_)));
        assert_eq!(parse_blkid_export(""), Contents::Blank);
    }
}
