//! The open file streams of each sandbox, so that a delete ends them instead of waiting for them.
//!
//! A ReadFile or WriteFile stream holds its sandbox's root for as long as the client keeps it
//! open, and for a stopped sandbox that root is a temporary mount holding the sandbox's lock.
//! A delete would wait behind an idle writer for as long as the client likes; instead it marks
//! the sandbox, every stream on it sees [`FileStream::ended`] resolve, lets go of the root and
//! fails with ABORTED, and the delete takes the lock. Streams that start while the delete runs
//! are ended at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// Open file streams by sandbox id.
#[derive(Debug, Default)]
pub struct FileStreams {
    map: Mutex<HashMap<String, Entry>>,
}

#[derive(Debug)]
struct Entry {
    /// True while a delete of the sandbox runs.
    ended: watch::Sender<bool>,
    /// Streams registered on this id.
    open: usize,
    /// Deletes of this id in progress.
    deletes: usize,
}

impl Entry {
    fn new(ended: bool) -> Entry {
        Entry {
            ended: watch::Sender::new(ended),
            open: 0,
            deletes: 0,
        }
    }
}

/// One open file stream of a sandbox; deregisters on drop.
#[derive(Debug)]
pub struct FileStream {
    streams: Arc<FileStreams>,
    id: String,
    ended: watch::Receiver<bool>,
}

/// A delete of a sandbox in progress: its file streams are ended until this drops.
#[derive(Debug)]
pub struct Deleting {
    streams: Arc<FileStreams>,
    id: String,
}

impl FileStreams {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a file stream on sandbox `id`.
    pub fn open(self: &Arc<Self>, id: &str) -> FileStream {
        let mut map = self.entries();
        let entry = map
            .entry(id.to_string())
            .or_insert_with(|| Entry::new(false));
        entry.open += 1;
        FileStream {
            streams: self.clone(),
            id: id.to_string(),
            ended: entry.ended.subscribe(),
        }
    }

    /// Ends every file stream of sandbox `id`, and those opened until the mark drops.
    pub fn delete(self: &Arc<Self>, id: &str) -> Deleting {
        let mut map = self.entries();
        let entry = map
            .entry(id.to_string())
            .or_insert_with(|| Entry::new(true));
        entry.deletes += 1;
        entry.ended.send_replace(true);
        Deleting {
            streams: self.clone(),
            id: id.to_string(),
        }
    }

    /// How many ids have an entry (open streams or a delete in progress).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries().len()
    }
}

impl FileStream {
    /// Resolves once a delete of the stream's sandbox has begun.
    pub async fn ended(&mut self) {
        if self.ended.wait_for(|ended| *ended).await.is_err() {
            // The delete finished and a new generation began: this stream was not ended.
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for FileStream {
    fn drop(&mut self) {
        let mut map = self.streams.entries();
        if let Some(entry) = map.get_mut(&self.id) {
            entry.open -= 1;
            if entry.open == 0 && entry.deletes == 0 {
                map.remove(&self.id);
            }
        }
    }
}

impl Drop for Deleting {
    fn drop(&mut self) {
        let mut map = self.streams.entries();
        let Some(entry) = map.get_mut(&self.id) else {
            return;
        };
        entry.deletes -= 1;
        if entry.deletes > 0 {
            return;
        }
        if entry.open == 0 {
            map.remove(&self.id);
        } else {
            // Streams still closing keep the old channel (and see it ended); new ones start
            // on a fresh one. A sandbox made again under the same id is not ended.
            entry.ended = watch::Sender::new(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[tokio::test]
    async fn a_delete_ends_the_streams_of_its_sandbox_only() {
        let streams = Arc::new(FileStreams::default());
        let mut a = streams.open("a");
        let mut b = streams.open("b");
        assert!(a.ended().now_or_never().is_none());
        let deleting = streams.delete("a");
        assert!(a.ended().now_or_never().is_some());
        assert!(b.ended().now_or_never().is_none());
        // A stream opened while the delete runs is ended at once.
        let mut late = streams.open("a");
        assert!(late.ended().now_or_never().is_some());
        drop(deleting);
        // Streams that were ended stay ended; new ones are not.
        assert!(a.ended().now_or_never().is_some());
        let mut fresh = streams.open("a");
        assert!(fresh.ended().now_or_never().is_none());
        drop((a, b, late, fresh));
        assert_eq!(streams.len(), 0);
    }

    #[tokio::test]
    async fn entries_go_when_nothing_uses_them() {
        let streams = Arc::new(FileStreams::default());
        drop(streams.delete("x"));
        drop(streams.open("x"));
        assert_eq!(streams.len(), 0);
        let one = streams.delete("y");
        let two = streams.delete("y");
        drop(one);
        let mut s = streams.open("y");
        assert!(
            s.ended().now_or_never().is_some(),
            "the second delete still runs"
        );
        drop(two);
        drop(s);
        assert_eq!(streams.len(), 0);
    }
}
