//! `sandboxd image pull|ls|get|rm`, with a progress bar for pulls.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use super::Transport;
use clap::Subcommand;
use serde_json::{json, Value};

use super::output::{self, Table};
use super::{Error, Format, Result};
use crate::pb;
use crate::pb::image_service_client::ImageServiceClient;

/// How often the progress bar is redrawn at most.
const REDRAW_INTERVAL: Duration = Duration::from_millis(100);
/// Width of the progress bar in cells, between its brackets.
const BAR_WIDTH: usize = 30;

/// The `image` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Pull an image into the server's node (progress on stderr); prints its digest.
    Pull {
        /// The reference, e.g. busybox:1.36 or 127.0.0.1:5000/team/app:v1.
        image: String,
    },
    /// List the images on the server's node.
    #[command(visible_alias = "list")]
    Ls,
    /// Show one image.
    #[command(visible_alias = "inspect")]
    Get {
        /// The image's reference.
        image: String,
    },
    /// Delete an image (sandboxes built on it keep running); prints its reference.
    #[command(visible_alias = "delete")]
    Rm {
        /// The image's reference.
        image: String,
    },
}

/// Runs one `image` subcommand.
pub async fn run(channel: Transport, format: Format, command: Command) -> Result<()> {
    let mut client = ImageServiceClient::new(channel);
    match command {
        Command::Pull { image } => {
            let mut stream = client
                .pull_image(pb::PullImageRequest {
                    image: image.clone(),
                })
                .await?
                .into_inner();
            let mut progress = Progress::new(&image, std::io::stderr().is_terminal());
            let mut pulled = None;
            let result = loop {
                match stream.message().await {
                    Ok(Some(msg)) => {
                        progress.update(&msg);
                        if let Some(img) = msg.image {
                            pulled = Some(img);
                        }
                    }
                    Ok(None) => break Ok(()),
                    Err(status) => break Err(status),
                }
            };
            progress.finish(pulled.as_ref());
            result?;
            let pulled = pulled.ok_or_else(|| {
                Error::Protocol("the pull ended without reporting the image".into())
            })?;
            match format {
                Format::Json => output::json(&json(&pulled)),
                Format::Table => output::line(&pulled.digest),
            }
        }
        Command::Ls => {
            let images = client
                .list_images(pb::ListImagesRequest {})
                .await?
                .into_inner()
                .images;
            match format {
                Format::Json => output::json(&Value::Array(images.iter().map(json).collect())),
                Format::Table => {
                    let mut table = Table::new(&["IMAGE", "DIGEST", "SIZE", "CREATED"]);
                    for i in &images {
                        table.row(vec![
                            i.name.clone(),
                            output::short_digest(&i.digest),
                            output::size(i.size_bytes),
                            output::relative(i.created_at.as_ref()),
                        ]);
                    }
                    table.print()
                }
            }
        }
        Command::Get { image } => {
            let i = client
                .get_image(pb::GetImageRequest { image })
                .await?
                .into_inner()
                .image
                .unwrap_or_default();
            match format {
                Format::Json => output::json(&json(&i)),
                Format::Table => output::emit(&output::fields(&[
                    ("Image", i.name.clone()),
                    ("Digest", i.digest.clone()),
                    ("Size", output::size(i.size_bytes)),
                    ("Created", output::time_text(i.created_at.as_ref())),
                ])),
            }
        }
        Command::Rm { image } => {
            client
                .delete_image(pb::DeleteImageRequest {
                    image: image.clone(),
                })
                .await?;
            match format {
                Format::Json => output::json(&json!({ "image": image, "deleted": true })),
                Format::Table => output::line(&image),
            }
        }
    }
}

/// An image as JSON: the proto's field names and an RFC 3339 time.
fn json(i: &pb::Image) -> Value {
    json!({
        "name": i.name,
        "digest": i.digest,
        "size_bytes": i.size_bytes,
        "created_at": output::time_json(i.created_at.as_ref()),
    })
}

/// Pull progress on stderr: one redrawn bar on a terminal, one line per step otherwise.
struct Progress {
    image: String,
    terminal: bool,
    /// Bytes done and total of every blob seen, by digest.
    blobs: BTreeMap<String, (i64, i64)>,
    status: String,
    last_draw: Option<Instant>,
    /// The last status printed for each digest, so plain output gets one line per step.
    printed: BTreeMap<String, String>,
}

impl Progress {
    fn new(image: &str, terminal: bool) -> Progress {
        Progress {
            image: image.to_string(),
            terminal,
            blobs: BTreeMap::new(),
            status: String::new(),
            last_draw: None,
            printed: BTreeMap::new(),
        }
    }

    fn update(&mut self, msg: &pb::PullImageResponse) {
        if msg.image.is_some() {
            return;
        }
        if matches!(msg.status.as_str(), "downloading" | "downloaded" | "exists")
            && !msg.digest.is_empty()
        {
            self.blobs
                .insert(msg.digest.clone(), (msg.bytes_done, msg.bytes_total));
        }
        let status_changed = self.status != msg.status;
        self.status.clone_from(&msg.status);
        if self.terminal {
            let due = self
                .last_draw
                .is_none_or(|t| t.elapsed() >= REDRAW_INTERVAL);
            if status_changed || due {
                self.draw();
            }
        } else if self.printed.get(&msg.digest) != Some(&msg.status) {
            self.printed.insert(msg.digest.clone(), msg.status.clone());
            let mut line = format!("{}: {}", self.image, msg.status);
            if !msg.digest.is_empty() {
                line.push_str(&format!(" {}", output::short_digest(&msg.digest)));
            }
            if msg.bytes_total > 0 {
                line.push_str(&format!(" ({})", output::size(msg.bytes_total)));
            }
            eprintln!("{line}");
        }
    }

    fn draw(&mut self) {
        let (done, total) = self
            .blobs
            .values()
            .fold((0, 0), |(d, t), (bd, bt)| (d + bd, t + bt));
        let filled = if total > 0 {
            ((done.clamp(0, total) as f64 / total as f64) * BAR_WIDTH as f64) as usize
        } else {
            0
        };
        let bar: String = std::iter::repeat_n('#', filled)
            .chain(std::iter::repeat_n('.', BAR_WIDTH - filled))
            .collect();
        let mut err = std::io::stderr().lock();
        // \r and erase-to-end-of-line redraw the same terminal line; errors only lose progress.
        let _ = write!(
            err,
            "\r\x1b[K{}: {:<11} [{bar}] {} / {}",
            self.image,
            self.status,
            output::size(done),
            output::size(total)
        );
        let _ = err.flush();
        self.last_draw = Some(Instant::now());
    }

    fn finish(&mut self, image: Option<&pb::Image>) {
        let summary = image.map(|i| {
            format!(
                "{}: pulled {} ({})",
                self.image,
                i.digest,
                output::size(i.size_bytes)
            )
        });
        if self.terminal {
            if self.last_draw.is_some() {
                eprint!("\r\x1b[K");
            }
            if let Some(s) = summary {
                eprintln!("{s}");
            }
        } else if let Some(s) = summary {
            eprintln!("{s}");
        }
    }
}
