//! Per-sandbox operation locks, so two calls never interleave steps on one sandbox.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::error::{Error, Result};

/// How long a call waits for another operation on the same sandbox (or with the same request
/// id) before it gives up with UNAVAILABLE: a stuck operation never piles up callers forever.
pub const LOCK_WAIT: Duration = Duration::from_secs(60);

/// A map of async mutexes by key; entries vanish when no one holds or waits for them.
#[derive(Debug, Default)]
pub struct KeyedLocks {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Holds one key's lock until dropped.
pub struct KeyGuard {
    locks: Arc<KeyedLocks>,
    key: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl KeyedLocks {
    /// Waits up to [`LOCK_WAIT`] for the lock of `key`; UNAVAILABLE after that.
    pub async fn lock(self: &Arc<Self>, key: &str) -> Result<KeyGuard> {
        self.lock_within(key, LOCK_WAIT).await
    }

    /// Waits up to `wait` for the lock of `key`.
    pub async fn lock_within(self: &Arc<Self>, key: &str, wait: Duration) -> Result<KeyGuard> {
        let mutex = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key.to_string()).or_default().clone()
        };
        // Made before the wait, so that a wait given up still drops its claim on the entry.
        let mut waiting = KeyGuard {
            locks: self.clone(),
            key: key.to_string(),
            guard: None,
        };
        match tokio::time::timeout(wait, mutex.lock_owned()).await {
            Ok(guard) => {
                waiting.guard = Some(guard);
                Ok(waiting)
            }
            Err(_) => Err(Error::Unavailable {
                op: "lock",
                message: format!("{key:?} is busy with another operation (waited {wait:?}); retry"),
            }),
        }
    }

    /// Whether anyone waits for the lock of `key` besides its holder.
    pub fn contended(&self, key: &str) -> bool {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        // The map's own reference, the holder's, and one per waiter.
        map.get(key).is_some_and(|m| Arc::strong_count(m) > 2)
    }
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self.locks.map.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map itself still refers to the mutex: nobody holds or awaits it.
        if map
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn entries_are_dropped_after_use() {
        let locks = Arc::new(KeyedLocks::default());
        {
            let _a = locks.lock("a").await.unwrap();
            assert_eq!(locks.map.lock().unwrap().len(), 1);
        }
        assert!(locks.map.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn contention_counts_waiters_not_the_holder() {
        let locks = Arc::new(KeyedLocks::default());
        assert!(!locks.contended("a"));
        let held = locks.lock("a").await.unwrap();
        assert!(!locks.contended("a"));
        let waiter = tokio::spawn({
            let locks = locks.clone();
            async move { locks.lock("a").await.map(drop) }
        });
        while !locks.contended("a") {
            tokio::task::yield_now().await;
        }
        drop(held);
        waiter.await.unwrap().unwrap();
        assert!(!locks.contended("a"));
    }

    #[tokio::test]
    async fn a_wait_is_bounded_and_leaves_no_entry_behind() {
        let locks = Arc::new(KeyedLocks::default());
        let held = locks.lock("a").await.unwrap();
        let err = locks
            .lock_within("a", Duration::from_millis(20))
            .await
            .err()
            .expect("the second lock times out");
        assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
        drop(held);
        assert!(locks.map.lock().unwrap().is_empty());
        let _again = locks
            .lock_within("a", Duration::from_millis(20))
            .await
            .unwrap();
    }
}
