//! `sandboxd cp SRC DST`: one file between the local disk (or stdin/stdout) and a sandbox,
//! through FileService.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::Transport;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

use super::stdio;
use super::{Error, Result};
use crate::pb;
use crate::pb::file_service_client::FileServiceClient;
use crate::pb::write_file_request::Request as WriteMsg;

/// Bytes per WriteFile `data` message.
const UPLOAD_CHUNK: usize = 64 * 1024;
/// WriteFile messages queued between the local reader and the stream.
const UPLOAD_QUEUE: usize = 4;
/// Permission bits of a download whose source is a symlink (StatFile does not follow it).
const DEFAULT_FILE_MODE: u32 = 0o644;

/// Arguments of `cp`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Examples:\n  \
    sandboxd cp ./script.sh demo:/tmp/script.sh   upload, keeping the file's mode\n  \
    sandboxd cp demo:/etc/os-release .            download into the current directory\n  \
    echo hi | sandboxd cp - demo:/tmp/hi.txt      stdin to a file in the sandbox")]
pub struct Args {
    /// The source: a local path, `-` for stdin, or SANDBOX:/path.
    src: String,
    /// The destination: a local path (an existing directory receives the file under its own
    /// name), `-` for stdout, or SANDBOX:/path.
    dst: String,
}

/// One side of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Location {
    /// A path on the local disk.
    Local(PathBuf),
    /// stdin as a source, stdout as a destination.
    Stdio,
    /// An absolute path inside a sandbox.
    Sandbox { id: String, path: String },
}

impl Location {
    /// `-`, `SANDBOX:/path`, or a local path. A colon after a `/` (or in a path starting with
    /// `.` or `/`) is part of a local name.
    fn parse(s: &str) -> Result<Location> {
        if s == "-" {
            return Ok(Location::Stdio);
        }
        if s.starts_with(['/', '.']) {
            return Ok(Location::Local(PathBuf::from(s)));
        }
        match s.split_once(':') {
            Some((id, path)) if !id.is_empty() && !id.contains('/') => {
                if !path.starts_with('/') {
                    return Err(Error::Usage(format!(
                        "{s:?}: a sandbox path must be absolute, as in {id}:/path"
                    )));
                }
                Ok(Location::Sandbox {
                    id: id.to_string(),
                    path: path.to_string(),
                })
            }
            _ if s.is_empty() => Err(Error::Usage("cp: empty path".into())),
            _ => Ok(Location::Local(PathBuf::from(s))),
        }
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Copies the file.
pub async fn run(channel: Transport, args: Args) -> Result<()> {
    let src = Location::parse(&args.src)?;
    let dst = Location::parse(&args.dst)?;
    let mut client = FileServiceClient::new(channel);
    match (src, dst) {
        (Location::Sandbox { .. }, Location::Sandbox { .. }) => Err(Error::Usage(
            "cp: both sides are in a sandbox; one side must be local".into(),
        )),
        (Location::Sandbox { id, path }, local) => download(&mut client, &id, &path, local).await,
        (local, Location::Sandbox { id, path }) => upload(&mut client, local, &id, &path).await,
        (_, _) => Err(Error::Usage(
            "cp: both sides are local; name the sandbox side as SANDBOX:/path".into(),
        )),
    }
}

/// The last component of a path, for copies into a directory.
fn file_name(path: &str) -> Option<&str> {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
}

async fn upload(
    client: &mut FileServiceClient<Transport>,
    src: Location,
    id: &str,
    dst: &str,
) -> Result<()> {
    let (name, mode, reader): (Option<String>, u32, Box<dyn Read + Send>) = match &src {
        Location::Local(path) => {
            let what = || format!("open {}", path.display());
            let file = std::fs::File::open(path).map_err(Error::io(what()))?;
            let meta = file.metadata().map_err(Error::io(what()))?;
            if meta.is_dir() {
                return Err(Error::Refused(format!(
                    "{} is a directory; cp copies single files",
                    path.display()
                )));
            }
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            (name, meta.permissions().mode() & 0o7777, Box::new(file))
        }
        // 0: the server's default mode for new files.
        _ => (None, 0, Box::new(std::io::stdin())),
    };
    let target = remote_target(client, id, dst, name.as_deref()).await?;

    let mut chunks = stdio::read_chunks(reader, UPLOAD_CHUNK, UPLOAD_QUEUE)
        .map_err(Error::io("start a reader thread"))?;
    let (tx, rx) = mpsc::channel(UPLOAD_QUEUE);
    tx.try_send(pb::WriteFileRequest {
        request: Some(WriteMsg::Header(pb::WriteFileHeader {
            sandbox_id: id.to_string(),
            path: target,
            mode,
            ..Default::default()
        })),
    })
    .expect("an empty queue has room for the header");
    let (failed_tx, failed_rx) = oneshot::channel();
    let _feeder = AbortOnDrop(tokio::spawn(async move {
        // The end of `chunks` drops `tx`, which ends the stream: the server commits the file.
        while let Some(chunk) = chunks.recv().await {
            match chunk {
                Ok(data) => {
                    let msg = pb::WriteFileRequest {
                        request: Some(WriteMsg::Data(data)),
                    };
                    if tx.send(msg).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = failed_tx.send(e);
                    // Keep `tx` open: a clean end of the stream would commit a truncated file.
                    let never: std::convert::Infallible = std::future::pending().await;
                    match never {}
                }
            }
        }
    }));
    tokio::select! {
        written = client.write_file(ReceiverStream::new(rx)) => {
            written?;
            Ok(())
        }
        // Returning drops the call, which cancels it: the server discards the partial file.
        Ok(e) = failed_rx => Err(Error::Io {
            what: format!("read {}", display(&src)),
            source: e,
        }),
    }
}

/// Where an upload lands: `dst` itself, or `dst/NAME` when `dst` is a directory.
async fn remote_target(
    client: &mut FileServiceClient<Transport>,
    id: &str,
    dst: &str,
    name: Option<&str>,
) -> Result<String> {
    let into_dir = |name: Option<&str>| match name.and_then(file_name) {
        Some(n) => Ok(format!("{}/{n}", dst.trim_end_matches('/'))),
        None => Err(Error::Usage(format!(
            "cp: {id}:{dst} is a directory; name the file to write, as in {id}:{}/NAME",
            dst.trim_end_matches('/')
        ))),
    };
    if dst.ends_with('/') {
        return into_dir(name);
    }
    let stat = client
        .stat_file(pb::StatFileRequest {
            sandbox_id: id.to_string(),
            path: dst.to_string(),
        })
        .await;
    match stat {
        Ok(r) if is_dir(r.get_ref().entry.as_ref()) => into_dir(name),
        Ok(_) => Ok(dst.to_string()),
        Err(s) if s.code() == Code::NotFound => Ok(dst.to_string()),
        Err(s) => Err(s.into()),
    }
}

fn is_dir(entry: Option<&pb::FileEntry>) -> bool {
    entry.is_some_and(|e| e.r#type == pb::FileType::Directory as i32)
}

async fn download(
    client: &mut FileServiceClient<Transport>,
    id: &str,
    src: &str,
    dst: Location,
) -> Result<()> {
    let entry = client
        .stat_file(pb::StatFileRequest {
            sandbox_id: id.to_string(),
            path: src.to_string(),
        })
        .await?
        .into_inner()
        .entry
        .unwrap_or_default();
    if entry.r#type == pb::FileType::Directory as i32 {
        return Err(Error::Refused(format!(
            "{id}:{src} is a directory; cp copies single files"
        )));
    }
    // Never create setuid or setgid files locally from a sandbox's content.
    let mode = if entry.r#type == pb::FileType::Symlink as i32 {
        DEFAULT_FILE_MODE
    } else {
        entry.mode & 0o777
    };
    let mut stream = client
        .read_file(pb::ReadFileRequest {
            sandbox_id: id.to_string(),
            path: src.to_string(),
            offset: 0,
            length: 0,
        })
        .await?
        .into_inner();
    match dst {
        Location::Local(path) => {
            let target = local_target(&path, src)?;
            let (temp, mut file) = TempFile::create(&target, mode).await?;
            let what = || format!("write {}", temp.path.display());
            while let Some(chunk) = stream.message().await? {
                file.write_all(&chunk.data)
                    .await
                    .map_err(Error::io(what()))?;
            }
            temp.persist(file, &target).await
        }
        _ => {
            let mut out = std::io::stdout();
            while let Some(chunk) = stream.message().await? {
                stdio::write(&mut out, &chunk.data, "stdout")?;
            }
            Ok(())
        }
    }
}

/// Where a download lands: `dst` itself, or `dst/NAME` when `dst` is a directory.
fn local_target(dst: &Path, src: &str) -> Result<PathBuf> {
    let is_dir = dst.is_dir() || dst.as_os_str().to_string_lossy().ends_with('/');
    if !is_dir {
        return Ok(dst.to_path_buf());
    }
    let name =
        file_name(src).ok_or_else(|| Error::Usage(format!("cp: {src:?} does not name a file")))?;
    Ok(dst.join(name))
}

fn display(l: &Location) -> String {
    match l {
        Location::Local(p) => p.display().to_string(),
        Location::Stdio => "stdin".into(),
        Location::Sandbox { id, path } => format!("{id}:{path}"),
    }
}

/// A file written next to its target and renamed over it once complete, so a failed download
/// never leaves a truncated file behind; removed on drop unless persisted.
struct TempFile {
    path: PathBuf,
    persisted: bool,
}

impl TempFile {
    async fn create(target: &Path, mode: u32) -> Result<(TempFile, tokio::fs::File)> {
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let path = target.with_file_name(format!(".{name}.sandboxd-cp-{}", std::process::id()));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .await
            .map_err(Error::io(format!("create {}", path.display())))?;
        let temp = TempFile {
            path,
            persisted: false,
        };
        // The umask applied at open; the file gets exactly the sandbox's permission bits.
        tokio::fs::set_permissions(&temp.path, std::fs::Permissions::from_mode(mode))
            .await
            .map_err(Error::io(format!("chmod {}", temp.path.display())))?;
        Ok((temp, file))
    }

    async fn persist(mut self, mut file: tokio::fs::File, target: &Path) -> Result<()> {
        file.flush()
            .await
            .map_err(Error::io(format!("write {}", self.path.display())))?;
        drop(file);
        tokio::fs::rename(&self.path, target)
            .await
            .map_err(Error::io(format!("rename to {}", target.display())))?;
        self.persisted = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_tell_sandbox_paths_from_local_ones() {
        let sandbox = |id: &str, path: &str| Location::Sandbox {
            id: id.into(),
            path: path.into(),
        };
        assert_eq!(
            Location::parse("sb:/etc/x").unwrap(),
            sandbox("sb", "/etc/x")
        );
        assert_eq!(Location::parse("-").unwrap(), Location::Stdio);
        assert_eq!(
            Location::parse("./a:b").unwrap(),
            Location::Local("./a:b".into())
        );
        assert_eq!(
            Location::parse("/tmp/a:/b").unwrap(),
            Location::Local("/tmp/a:/b".into())
        );
        assert_eq!(
            Location::parse("dir/a:/b").unwrap(),
            Location::Local("dir/a:/b".into())
        );
        assert_eq!(
            Location::parse("file.txt").unwrap(),
            Location::Local("file.txt".into())
        );
        assert!(matches!(
            Location::parse("sb:relative"),
            Err(Error::Usage(_))
        ));
    }

    #[test]
    fn file_names_come_from_the_last_component() {
        assert_eq!(file_name("/etc/os-release"), Some("os-release"));
        assert_eq!(file_name("/tmp/dir/"), Some("dir"));
        assert_eq!(file_name("/"), None);
        assert_eq!(file_name("/a/.."), None);
    }
}
