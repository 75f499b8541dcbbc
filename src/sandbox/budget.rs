//! The memory budget ExecSync calls share: their captured output is held until the call ends,
//! so many calls at once (or a few with large `max_output_bytes`) could otherwise fill the
//! server's memory.

use std::sync::Arc;

use crate::error::Error;

/// The memory all ExecSync calls together may fill with captured output. Counted in KiB
/// permits of a semaphore as output is actually kept (not as much as a call may keep), so many
/// small calls run side by side and one call past the budget fails alone.
#[derive(Debug, Clone)]
pub struct ExecSyncBudget {
    kib: Arc<tokio::sync::Semaphore>,
    bytes: u64,
}

impl ExecSyncBudget {
    /// A budget of `bytes` (rounded up to whole KiB).
    pub fn new(bytes: u64) -> ExecSyncBudget {
        let kib = usize::try_from(bytes.div_ceil(1024))
            .unwrap_or(usize::MAX)
            .min(tokio::sync::Semaphore::MAX_PERMITS);
        ExecSyncBudget {
            kib: Arc::new(tokio::sync::Semaphore::new(kib)),
            bytes,
        }
    }

    /// An empty share of the budget for one call; what it covers returns to the budget when it
    /// is dropped.
    pub fn share(&self) -> BudgetShare {
        BudgetShare {
            budget: self.kib.clone(),
            held: None,
            bytes: 0,
        }
    }

    /// The error of a call that found the budget spent.
    pub(super) fn exhausted(&self) -> Error {
        Error::ResourceExhausted(format!(
            "the output of the ExecSync calls in progress reached the server's budget of {} bytes \
             (--exec-sync-memory); this call's process was killed. Retry later, lower \
             max_output_bytes, or stream the output with Exec",
            self.bytes
        ))
    }
}

/// One call's part of an [`ExecSyncBudget`].
#[derive(Debug)]
pub struct BudgetShare {
    budget: Arc<tokio::sync::Semaphore>,
    held: Option<tokio::sync::OwnedSemaphorePermit>,
    bytes: usize,
}

impl BudgetShare {
    /// The bytes covered so far.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Grows the share to cover `bytes` in all, at once or not at all; false when the budget
    /// has no room left for it.
    pub fn cover(&mut self, bytes: usize) -> bool {
        let held = self.bytes.div_ceil(1024);
        let need = bytes.div_ceil(1024);
        if need > held {
            let Ok(more) = u32::try_from(need - held) else {
                return false;
            };
            match self.budget.clone().try_acquire_many_owned(more) {
                Ok(permit) => match &mut self.held {
                    Some(h) => h.merge(permit),
                    None => self.held = Some(permit),
                },
                Err(_) => return false,
            }
        }
        self.bytes = self.bytes.max(bytes);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_take_what_is_kept_and_give_it_back() {
        let budget = ExecSyncBudget::new(10 * 1024);
        let mut a = budget.share();
        assert!(a.cover(1));
        assert!(a.cover(4 * 1024));
        assert_eq!(budget.kib.available_permits(), 6);
        let mut b = budget.share();
        assert!(b.cover(6 * 1024));
        // All taken: one more byte does not fit, and a refusal takes nothing.
        assert!(!a.cover(4 * 1024 + 1));
        assert_eq!(a.bytes(), 4 * 1024);
        drop(b);
        assert!(a.cover(4 * 1024 + 1));
        assert_eq!(budget.kib.available_permits(), 5);
        drop(a);
        assert_eq!(budget.kib.available_permits(), 10);
    }

    #[test]
    fn the_error_names_the_setting() {
        let e = ExecSyncBudget::new(1 << 20).exhausted();
        assert!(matches!(e, Error::ResourceExhausted(_)), "{e:?}");
        assert!(e.to_string().contains("--exec-sync-memory"), "{e}");
    }
}
