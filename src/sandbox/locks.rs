//! Per-sandbox operation locks, so two calls never interleave steps on one sandbox.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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
    /// Waits for the lock of `key`.
    pub async fn lock(self: &Arc<Self>, key: &str) -> KeyGuard {
        let mutex = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key.to_string()).or_default().clone()
        };
        let guard = mutex.lock_owned().await;
        KeyGuard {
            locks: self.clone(),
            key: key.to_string(),
            guard: Some(guard),
        }
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
            let _a = locks.lock("a").await;
            assert_eq!(locks.map.lock().unwrap().len(), 1);
        }
        assert!(locks.map.lock().unwrap().is_empty());
    }
}
