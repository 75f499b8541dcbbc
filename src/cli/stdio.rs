//! Blocking local streams (stdin, stdout, files) bridged to the async commands.

use std::io::{Read, Write};

use tokio::sync::mpsc;

use super::{Error, Result};

/// Reads `reader` on a thread of its own, in chunks of at most `chunk` bytes, into a channel
/// of `queue` chunks. The channel ends at EOF, or after the first read error.
///
/// A plain thread, not the runtime's blocking pool: a read(2) on a terminal cannot be
/// cancelled, and a pool thread blocked in one would keep the runtime from shutting down.
pub fn read_chunks(
    mut reader: impl Read + Send + 'static,
    chunk: usize,
    queue: usize,
) -> std::io::Result<mpsc::Receiver<std::io::Result<Vec<u8>>>> {
    let (tx, rx) = mpsc::channel(queue);
    std::thread::Builder::new()
        .name("sandboxd-read".into())
        .spawn(move || {
            let mut buf = vec![0; chunk];
            loop {
                let item = match reader.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => Ok(buf[..n].to_vec()),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => Err(e),
                };
                let failed = item.is_err();
                if tx.blocking_send(item).is_err() || failed {
                    return;
                }
            }
        })?;
    Ok(rx)
}

/// Writes and flushes `data`; `name` names the stream in the error.
///
/// Blocking on purpose: while the local side cannot take more output, the command's output is
/// not read either, and the server's flow control slows the command down.
pub fn write(out: &mut impl Write, data: &[u8], name: &str) -> Result<()> {
    out.write_all(data)
        .and_then(|()| out.flush())
        .map_err(Error::io(format!("write to {name}")))
}
