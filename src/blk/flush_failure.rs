//! The sticky record of a device's failed flush.

/// A device's sticky record of a failed flush. The kernel reports a writeback error of the
/// image once per file (errseq): the next fsync succeeds although the writes it stood for are
/// lost. So the first failure is kept here for the device's life, for its owner to refuse a
/// clean teardown and to show in the volume's condition.
#[derive(Debug, Default)]
pub struct FlushFailure {
    first: std::sync::Mutex<Option<String>>,
}

impl FlushFailure {
    /// Records a failure; the first one is kept.
    pub fn record(&self, why: String) {
        let mut first = self.first.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if first.is_none() {
            tracing::error!(error = %why, "a flush failed: completed writes may be lost");
            *first = Some(why);
        }
    }

    /// The first failure, if any.
    pub fn get(&self) -> Option<String> {
        self.first.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}
