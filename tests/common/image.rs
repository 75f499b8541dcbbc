//! OCI image layouts built offline from the host's static busybox.
//!
//! Layouts are cached under `std::env::temp_dir()/sandboxd-test-images/`, keyed by a hash of the
//! busybox binary, this builder's format version and any extra layers, so each is built once per
//! machine. A build goes to a temporary directory that is renamed into place, which makes
//! concurrent tests (and concurrent test binaries) safe.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use flate2::write::GzEncoder;
use flate2::Compression;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::host;

/// The host's static busybox (Debian's busybox-static).
pub const HOST_BUSYBOX: &str = "/bin/busybox";
/// The tag every layout carries in index.json (`org.opencontainers.image.ref.name`).
pub const LAYOUT_TAG: &str = "latest";
/// PATH in the image config.
pub const IMAGE_PATH_ENV: &str =
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Bump when the layout's content changes, so stale caches are not reused.
const FORMAT_VERSION: &str = "sandboxd-test-layout-v1";
/// Fixed timestamp for tar entries and the config, so identical inputs give identical digests.
const EPOCH_SECS: u64 = 1_700_000_000;
const EPOCH_RFC3339: &str = "2023-11-14T22:13:20Z";

const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// The default cache root: `std::env::temp_dir()/sandboxd-test-images`.
pub fn image_cache_dir() -> PathBuf {
    std::env::temp_dir().join("sandboxd-test-images")
}

/// The busybox layout in the default cache (built on first use).
pub fn busybox_layout() -> PathBuf {
    build_busybox_layout(&image_cache_dir())
}

/// Builds (or reuses) the one-layer busybox OCI layout under `cache_root`; returns its path.
pub fn build_busybox_layout(cache_root: &Path) -> PathBuf {
    build_layout_layers(cache_root, &[])
}

/// The busybox layout plus a second layer holding `files` (path in the image, content), in the
/// default cache. Files are mode 0644, or 0755 when they start with `#!`; parent directories are
/// added as needed. A file named `.wh.NAME` is an OCI whiteout deleting NAME from below.
pub fn build_layout_with(files: &[(&str, &[u8])]) -> PathBuf {
    build_layout_layers(&image_cache_dir(), &[files])
}

/// The busybox layer followed by one layer per entry of `extra_layers`, cached under
/// `cache_root`; returns the layout's path. Every layer is a separate gzip blob, so a pull
/// makes one committed snapshot per layer.
pub fn build_layout_layers(cache_root: &Path, extra_layers: &[&[(&str, &[u8])]]) -> PathBuf {
    host::require_prerequisites();
    let busybox = fs::read(HOST_BUSYBOX)
        .unwrap_or_else(|e| panic!("read {HOST_BUSYBOX}: {e}; run scripts/install-deps.sh"));

    let mut key = Sha256::new();
    key.update(FORMAT_VERSION);
    key.update(Sha256::digest(&busybox));
    for layer in extra_layers {
        key.update((layer.len() as u64).to_le_bytes());
        for (path, content) in *layer {
            key.update((path.len() as u64).to_le_bytes());
            key.update(path.as_bytes());
            key.update((content.len() as u64).to_le_bytes());
            key.update(content);
        }
    }
    let key = hex::encode(key.finalize());
    let name = if extra_layers.is_empty() {
        format!("busybox-{}", &key[..24])
    } else {
        format!("busybox-{}-{}l", &key[..24], extra_layers.len() + 1)
    };
    let target = cache_root.join(name);
    if target.join("index.json").is_file() {
        return target;
    }

    fs::create_dir_all(cache_root)
        .unwrap_or_else(|e| panic!("create image cache {}: {e}", cache_root.display()));
    let staging = tempfile::Builder::new()
        .prefix(".building-")
        .tempdir_in(cache_root)
        .unwrap_or_else(|e| panic!("create staging dir in {}: {e}", cache_root.display()));

    let mut layers = vec![busybox_layer_tar(&busybox)];
    layers.extend(extra_layers.iter().map(|files| extra_layer_tar(files)));
    write_layout(staging.path(), &layers)
        .unwrap_or_else(|e| panic!("write OCI layout in {}: {e}", staging.path().display()));

    match fs::rename(staging.path(), &target) {
        Ok(()) => {
            // Renamed into place: nothing left for the guard to delete.
            let _ = staging.keep();
        }
        // Another test won the race; its layout is identical, ours is dropped.
        Err(_) if target.join("index.json").is_file() => {}
        Err(e) => panic!("rename layout to {}: {e}", target.display()),
    }
    target
}

/// Digests read back from a layout, for tests that check what containerd stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutInfo {
    /// `sha256:...` of the manifest (what a registry serves for the tag).
    pub manifest_digest: String,
    /// `sha256:...` of the image config.
    pub config_digest: String,
    /// `sha256:...` of each compressed layer blob, bottom first.
    pub layer_digests: Vec<String>,
    /// `rootfs.diff_ids`: `sha256:...` of each uncompressed layer tar, bottom first.
    pub diff_ids: Vec<String>,
}

impl LayoutInfo {
    /// Reads index.json, the manifest and the config of the layout at `layout`.
    pub fn read(layout: &Path) -> LayoutInfo {
        let read_json = |path: PathBuf| -> Value {
            let bytes = fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("parse {}: {e}", path.display()))
        };
        let blob = |digest: &str| {
            let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
            layout.join("blobs/sha256").join(hex)
        };
        let index = read_json(layout.join("index.json"));
        let manifest_digest = index["manifests"][0]["digest"]
            .as_str()
            .expect("index.json has a manifest digest")
            .to_owned();
        let manifest = read_json(blob(&manifest_digest));
        let config_digest = manifest["config"]["digest"]
            .as_str()
            .expect("manifest has a config digest")
            .to_owned();
        let layer_digests = manifest["layers"]
            .as_array()
            .expect("manifest has layers")
            .iter()
            .map(|l| l["digest"].as_str().expect("layer digest").to_owned())
            .collect();
        let config = read_json(blob(&config_digest));
        let diff_ids = config["rootfs"]["diff_ids"]
            .as_array()
            .expect("config has rootfs.diff_ids")
            .iter()
            .map(|d| d.as_str().expect("diff id").to_owned())
            .collect();
        LayoutInfo {
            manifest_digest,
            config_digest,
            layer_digests,
            diff_ids,
        }
    }

    /// Chain IDs of the layers (the names of containerd's committed snapshots), bottom first.
    pub fn chain_ids(&self) -> Vec<String> {
        let mut chain: Vec<String> = Vec::with_capacity(self.diff_ids.len());
        for diff_id in &self.diff_ids {
            let next = match chain.last() {
                None => diff_id.clone(),
                Some(parent) => sha256_digest(format!("{parent} {diff_id}").as_bytes()),
            };
            chain.push(next);
        }
        chain
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// One entry of a layer tar.
enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    Symlink {
        path: String,
        target: String,
    },
}

/// The base layer: busybox, one symlink per applet, the usual top-level directories, and
/// passwd/group with root and nobody.
fn busybox_layer_tar(busybox: &[u8]) -> Vec<u8> {
    let mut entries = Vec::new();
    for (dir, mode) in [
        ("bin", 0o755),
        ("dev", 0o755),
        ("etc", 0o755),
        ("proc", 0o555),
        ("root", 0o700),
        ("sys", 0o555),
        ("tmp", 0o1777),
    ] {
        entries.push(Entry::Dir {
            path: dir.to_owned(),
            mode,
        });
    }
    entries.push(Entry::File {
        path: "bin/busybox".to_owned(),
        mode: 0o755,
        data: busybox.to_vec(),
    });
    for applet in busybox_applets() {
        entries.push(Entry::Symlink {
            path: format!("bin/{applet}"),
            target: "busybox".to_owned(),
        });
    }
    entries.push(Entry::File {
        path: "etc/passwd".to_owned(),
        mode: 0o644,
        data:
            b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
                .to_vec(),
    });
    entries.push(Entry::File {
        path: "etc/group".to_owned(),
        mode: 0o644,
        data: b"root:x:0:\nnogroup:x:65534:\n".to_vec(),
    });
    tar_bytes(&entries)
}

/// Applet names from `busybox --list`, without busybox itself.
fn busybox_applets() -> Vec<String> {
    let out = Command::new(HOST_BUSYBOX)
        .arg("--list")
        .output()
        .unwrap_or_else(|e| panic!("run {HOST_BUSYBOX} --list: {e}"));
    assert!(
        out.status.success(),
        "{HOST_BUSYBOX} --list failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let applets: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && !a.contains('/') && *a != "busybox")
        .map(str::to_owned)
        .collect();
    assert!(
        applets.contains("sh"),
        "{HOST_BUSYBOX} has no sh applet: is it busybox-static?"
    );
    applets.into_iter().collect()
}

/// The first bytes of an ELF file: such files are made executable in a layer.
const ELF_MAGIC: &[u8] = b"\x7fELF";

/// The host's dynamically linked `binaries` at their own paths, with the shared libraries `ldd`
/// names for them (their content, at the paths the loader looks for), for a layer of
/// [`build_layout_layers`]: real programs of the host's userland inside a test image.
pub fn host_binaries_layer(binaries: &[&str]) -> Vec<(String, Vec<u8>)> {
    let mut paths = BTreeSet::new();
    for binary in binaries {
        paths.insert(binary.to_string());
        let out = Command::new("ldd")
            .arg(binary)
            .output()
            .unwrap_or_else(|e| panic!("run ldd {binary}: {e}"));
        assert!(
            out.status.success(),
            "ldd {binary} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Lines look like `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or
        // `/lib64/ld-linux-x86-64.so.2 (0x...)`; linux-vdso has no path.
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let path = line
                .split_whitespace()
                .find(|word| word.starts_with('/'))
                .map(str::to_owned);
            paths.extend(path);
        }
    }
    paths
        .into_iter()
        .map(|path| {
            let data = fs::read(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
            (path, data)
        })
        .collect()
}

/// A layer with `files` and the directories that lead to them.
fn extra_layer_tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut dirs = BTreeSet::new();
    for (path, _) in files {
        let rel = Path::new(path.trim_start_matches('/'));
        for ancestor in rel.ancestors().skip(1) {
            if !ancestor.as_os_str().is_empty() {
                dirs.insert(ancestor.to_string_lossy().into_owned());
            }
        }
    }
    // BTreeSet order puts a parent before its children.
    let mut entries: Vec<Entry> = dirs
        .into_iter()
        .map(|path| {
            let mode = match path.as_str() {
                "tmp" => 0o1777,
                "root" => 0o700,
                "proc" | "sys" => 0o555,
                _ => 0o755,
            };
            Entry::Dir { path, mode }
        })
        .collect();
    for (path, data) in files {
        let mode = if data.starts_with(b"#!") || data.starts_with(ELF_MAGIC) {
            0o755
        } else {
            0o644
        };
        entries.push(Entry::File {
            path: path.trim_start_matches('/').to_owned(),
            mode,
            data: data.to_vec(),
        });
    }
    tar_bytes(&entries)
}

/// An uncompressed tar of `entries`, owned by root, with fixed timestamps.
fn tar_bytes(entries: &[Entry]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(EPOCH_SECS);
        let appended = match entry {
            Entry::Dir { path, mode } => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(*mode);
                header.set_size(0);
                builder.append_data(&mut header, format!("{path}/"), io::empty())
            }
            Entry::File { path, mode, data } => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(*mode);
                header.set_size(data.len() as u64);
                builder.append_data(&mut header, path, data.as_slice())
            }
            Entry::Symlink { path, target } => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                builder.append_link(&mut header, path, target)
            }
        };
        appended.expect("append to in-memory tar");
    }
    builder.into_inner().expect("finish in-memory tar")
}

/// Writes blobs, manifest, index.json and oci-layout for `layer_tars` (uncompressed, bottom
/// first) into the empty directory `dir`.
fn write_layout(dir: &Path, layer_tars: &[Vec<u8>]) -> io::Result<()> {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    let put_blob = |bytes: &[u8]| -> io::Result<(String, usize)> {
        let digest = sha256_digest(bytes);
        fs::write(blobs.join(&digest["sha256:".len()..]), bytes)?;
        Ok((digest, bytes.len()))
    };

    let mut diff_ids = Vec::new();
    let mut layer_descriptors = Vec::new();
    let mut history = Vec::new();
    for (i, tar) in layer_tars.iter().enumerate() {
        diff_ids.push(sha256_digest(tar));
        let mut gz = GzEncoder::new(Vec::new(), Compression::default());
        gz.write_all(tar)?;
        let (digest, size) = put_blob(&gz.finish()?)?;
        layer_descriptors.push(json!({
            "mediaType": MEDIA_LAYER_GZIP,
            "digest": digest,
            "size": size,
        }));
        let created_by = if i == 0 {
            "sandboxd test harness: busybox".to_owned()
        } else {
            format!("sandboxd test harness: extra layer {i}")
        };
        history.push(json!({ "created": EPOCH_RFC3339, "created_by": created_by }));
    }

    let config = json!({
        "created": EPOCH_RFC3339,
        "architecture": oci_architecture(),
        "os": "linux",
        "config": {
            "Env": [IMAGE_PATH_ENV],
            "Cmd": ["sh"],
        },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
        "history": history,
    });
    let (config_digest, config_size) = put_blob(&serde_json::to_vec(&config)?)?;

    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": { "mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config_size },
        "layers": layer_descriptors,
    });
    let (manifest_digest, manifest_size) = put_blob(&serde_json::to_vec(&manifest)?)?;

    let index = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [{
            "mediaType": MEDIA_MANIFEST,
            "digest": manifest_digest,
            "size": manifest_size,
            "platform": { "architecture": oci_architecture(), "os": "linux" },
            "annotations": { "org.opencontainers.image.ref.name": LAYOUT_TAG },
        }],
    });
    fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    Ok(())
}

/// The OCI name of the host's architecture (the busybox we copy is the host's).
fn oci_architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}
