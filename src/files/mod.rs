//! File access inside a sandbox's root filesystem, confined to it.
//!
//! Confinement rests on one rule: a path inside the sandbox is only ever resolved by the kernel
//! with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)` relative to a descriptor of the
//! sandbox's root, so `..`, absolute or relative symlinks, chains of them and symlinks swapped in
//! during a call all stay inside the root. Changes act on the last component with the `*at`
//! system calls relative to a descriptor of its parent (opened the same way), which never follow
//! a symlink there. Trees are walked descriptor by descriptor without following symlinks (and a
//! removal never enters or removes a mount of a running sandbox). No host path string of a file
//! inside the sandbox is ever built; the only path strings opened on the host are the sandbox's
//! root itself and `/proc/self/fd/N`, which names a descriptor already open.
//!
//! Regular files are opened for I/O only after their type is checked on an `O_PATH` descriptor,
//! by re-opening that very descriptor through `/proc/self/fd`: opening a device node or FIFO that
//! an image or a sandbox planted could have effects on the host, so it never happens.
//!
//! `root` holds that rule (the [`Root`] and the only ways paths are opened against it); `path`
//! parses paths; `read`, `write`, `tree` and `watch` (inotify) are the operations built on it,
//! and `user` looks users up in the sandbox's own account files the same way.

mod path;
mod read;
mod root;
#[cfg(test)]
mod testing;
mod tree;
mod user;
mod watch;
mod write;

pub use path::{SandboxPath, MAX_NAME_LEN, MAX_PATH_LEN};
pub use read::{FileReader, ReadRange, READ_CHUNK, READ_QUEUE};
pub use root::{open_process_root, FileType, KeepAlive, Root};
pub use tree::{
    list, make_dir, remove, stat, FileEntry, ListDepth, DEFAULT_DIR_MODE, MAX_LIST_DEPTH,
    MAX_LIST_ENTRIES, MAX_REMOVE_DEPTH,
};
pub use user::{resolve_user, resolve_user_in, user_needs_lookup, MAX_ACCOUNT_FILE};
pub use watch::{FileEvent, FileEventKind, FileWatch, MAX_WATCHED_DIRS, WATCH_QUEUE};
pub use write::{AtomicWriter, WriteInput, WriteSpec, DEFAULT_FILE_MODE, TEMP_PREFIX, WRITE_QUEUE};
