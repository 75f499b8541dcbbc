//! Registry answers as a broken or hostile registry might send them: mutated manifests, indexes
//! and configs through the pull's own parsers, and whole pulls from a scripted registry on
//! loopback (auth challenges, tokens, digest and length headers, bodies that lie about their
//! size). Every answer ends in an image or a clear error, never a panic, and a size a document
//! declares is never allocated before the bytes arrive. A small deterministic generator (the seed
//! is in the failure message) keeps the tests dependency-free and repeatable.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tonic::Status;

use super::pull::{
    is_index, media_type_of, parse_config, parse_index, parse_manifest, pull, select_platform,
    MAX_CONFIG_SIZE,
};
use super::{go_arch, ImageRef, MEDIA_DOCKER_LIST, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST};
use crate::error::Error;
use crate::robust::Gen;
use crate::runtime::fake::Fake;
use crate::runtime::Store;

/// Mutated documents per kind through the parsers.
const CASES: usize = 3000;
/// Whole pulls from a scripted registry.
const PULL_CASES: usize = 300;
/// A pull from the scripted registry, which always answers at once, ends within this.
const PULL_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest request head the scripted registry reads.
const MAX_REQUEST_HEAD: usize = 64 << 10;
/// The repository and tag every case pulls.
const REPOSITORY: &str = "hostile/image";
const TAG: &str = "t";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Runs `check` on `cases` seeds, naming the seed of a case that panics.
fn each_case(name: &str, cases: usize, check: impl Fn(&mut Gen) + std::panic::RefUnwindSafe) {
    crate::robust::each_case(name, cases, 0x1a6e_0000, check);
}

impl Gen {
    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize].clone()
    }

    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn image_at(registry: &str) -> ImageRef {
    ImageRef::parse("image", &format!("{registry}/{REPOSITORY}:{TAG}")).unwrap()
}

/// A refusal is a registry error whose status message stays short.
fn assert_clear(what: &str, e: Error) {
    assert!(matches!(e, Error::Registry(_)), "{what}: {e:?}");
    let status = Status::from(e);
    assert!(
        status.message().len() <= 1024,
        "{what}: {} bytes",
        status.message().len()
    );
}

// ---- valid documents and their mutations ----

/// A consistent single-platform image behind an index. The fake backend's `apply` answers
/// the layer's digest as its diff id, so the config names the layers' digests as diff ids.
struct Image {
    layers: Vec<Vec<u8>>,
    config: Value,
    manifest: Value,
    index: Value,
}

fn layer_descriptor(layer: &[u8]) -> Value {
    json!({"mediaType": OCI_LAYER, "digest": digest_of(layer), "size": layer.len()})
}

fn valid_image(g: &mut Gen) -> Image {
    let layers: Vec<Vec<u8>> = (0..1 + g.below(3))
        .map(|_| {
            let n = 1 + g.below(4096) as usize;
            g.bytes(n)
        })
        .collect();
    let config = json!({
        "architecture": go_arch(),
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/"},
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| digest_of(l)).collect::<Vec<_>>(),
        },
    });
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": digest_of(&config_bytes), "size": config_bytes.len()},
        "layers": layers.iter().map(|l| layer_descriptor(l)).collect::<Vec<_>>(),
    });
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
    let index = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_INDEX,
        "manifests": [
            {"mediaType": MEDIA_OCI_MANIFEST, "digest": digest_of(b"other"), "size": 5,
             "platform": {"os": "windows", "architecture": "arm"}},
            {"mediaType": MEDIA_OCI_MANIFEST, "digest": digest_of(&manifest_bytes),
             "size": manifest_bytes.len(), "platform": {"os": "linux", "architecture": go_arch()}},
        ],
    });
    Image {
        layers,
        config,
        manifest,
        index,
    }
}

/// Values a hostile document puts where another belongs.
fn hostile_value(g: &mut Gen) -> Value {
    const MEDIA_TYPES: &[&str] = &[
        "",
        "application/json",
        MEDIA_OCI_INDEX,
        MEDIA_DOCKER_LIST,
        MEDIA_OCI_MANIFEST,
        "application/vnd.oci.image.manifest.v1+json; charset=utf-8",
        "text/html",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        "\u{0}",
        "💥/💥",
    ];
    const DIGESTS: &[&str] = &[
        "",
        "sha256:",
        "sha256:zz",
        "md5:d41d8cd98f00b204e9800998ecf8427e",
        "sha512:00",
        "SHA256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        ":",
        "sha256:../../etc/passwd",
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85",
    ];
    match g.below(20) {
        0 => Value::Null,
        1 => json!(g.one_in(2)),
        2 => json!(-1),
        3 => json!(1u64 << 40),
        4 => json!(u64::MAX),
        5 => json!(i64::MIN),
        6 => json!(i64::MAX as u64 + 1),
        7 => json!(1e308),
        8 => json!(-0.5),
        9 => json!(""),
        10 => json!("x".repeat(g.below(1 << 20) as usize)),
        11 => Value::Array((0..g.below(50_000)).map(|i| json!(i)).collect()),
        12 => json!({}),
        13 => json!([]),
        14 | 15 => json!(g.pick(MEDIA_TYPES)),
        16 | 17 => json!(g.pick(DIGESTS)),
        _ => json!({"mediaType": g.pick(MEDIA_TYPES), "digest": g.pick(DIGESTS), "size": -7}),
    }
}

/// A random node of `v`, reached by descending at random.
fn random_node<'a>(g: &mut Gen, v: &'a mut Value) -> &'a mut Value {
    let mut node = v;
    loop {
        let len = match &*node {
            Value::Object(map) => map.len(),
            Value::Array(items) => items.len(),
            _ => 0,
        };
        if len == 0 || g.one_in(3) {
            return node;
        }
        let i = g.below(len as u64) as usize;
        node = match node {
            Value::Object(map) => map.values_mut().nth(i).expect("i < len"),
            Value::Array(items) => &mut items[i],
            other => return other,
        };
    }
}

/// One structural mutation somewhere in `v`.
fn mutate_value(g: &mut Gen, v: &mut Value) {
    const KEYS: &[&str] = &[
        "size",
        "digest",
        "mediaType",
        "manifests",
        "layers",
        "config",
        "rootfs",
        "diff_ids",
        "platform",
        "schemaVersion",
        "architecture",
    ];
    let node = random_node(g, v);
    match g.below(6) {
        // Replace the node.
        0 | 1 => *node = hostile_value(g),
        // Drop a key, or an element.
        2 => match node {
            Value::Object(map) if !map.is_empty() => {
                let key = map.keys().nth(g.below(map.len() as u64) as usize).cloned();
                map.remove(&key.unwrap());
            }
            Value::Array(items) if !items.is_empty() => {
                items.remove(g.below(items.len() as u64) as usize);
            }
            _ => *node = Value::Null,
        },
        // Set a well-known key to a hostile value.
        3 => {
            if let Value::Object(map) = node {
                map.insert(g.pick(KEYS).to_owned(), hostile_value(g));
            }
        }
        // Swap the node's type.
        4 => {
            *node = match node.take() {
                Value::String(s) => json!([s]),
                Value::Number(n) => json!(n.to_string()),
                Value::Array(a) => json!({"items": a}),
                Value::Object(m) => Value::Array(m.into_values().collect()),
                Value::Bool(b) => json!(b as u8),
                Value::Null => json!(0),
            }
        }
        // Repeat the node many times (up to about 4 MiB of it).
        _ => {
            let len = serde_json::to_vec(node).map_or(1, |t| t.len());
            let times = 1 + g.below(2000).min((4 << 20) / len as u64);
            let copy = node.clone();
            *node = Value::Array(vec![copy; times as usize]);
        }
    }
}

/// `v` with 0 to 3 structural mutations, serialised, then sometimes mangled as text:
/// truncated, deeply nested, a byte flipped, invalid UTF-8, garbage appended.
fn mutated(g: &mut Gen, v: &Value) -> Vec<u8> {
    let mut v = v.clone();
    for _ in 0..g.below(4) {
        mutate_value(g, &mut v);
    }
    let mut text = serde_json::to_vec(&v).unwrap();
    match g.below(8) {
        0 if !text.is_empty() => text.truncate(g.below(text.len() as u64) as usize),
        1 => {
            let depth = g.below(200_000) as usize;
            let at = g.below(text.len() as u64 + 1) as usize;
            let nest = format!("{{\"manifests\":{}", "[".repeat(depth));
            text.splice(at..at, nest.into_bytes());
        }
        2 if !text.is_empty() => {
            let at = g.below(text.len() as u64) as usize;
            text[at] = g.next() as u8;
        }
        3 => text.extend_from_slice(&[0xff, 0xfe, 0x00, b'"']),
        4 => {
            let n = g.below(64) as usize;
            text.extend(g.bytes(n));
        }
        _ => {}
    }
    text
}

// ---- the parsers ----

/// Every parser a pull runs on a registry document, on `bytes` as whichever document it might
/// be; what they accept must be within the limits they promise.
fn through_parsers(image: &ImageRef, bytes: &[u8]) {
    let media = media_type_of(bytes);
    if is_index(&media, bytes) {
        match parse_index(image, bytes) {
            Ok(index) => {
                let _ = select_platform(&index);
            }
            Err(e) => assert_clear("index", e),
        }
    }
    match parse_manifest(image, bytes) {
        Ok((manifest, total)) => {
            assert!(manifest.config().size() <= MAX_CONFIG_SIZE);
            let sum = manifest
                .layers()
                .iter()
                .try_fold(manifest.config().size(), |s, l| s.checked_add(l.size()));
            assert_eq!(sum, Some(total as u64), "the declared total is the sum");
            assert!(total >= 0);
            if let Err(e) = parse_config(image, bytes, &manifest) {
                assert_clear("config", e);
            }
        }
        Err(e) => assert_clear("manifest", e),
    }
}

#[test]
fn mutated_manifests_indexes_and_configs_parse_or_are_refused_clearly() {
    let image = image_at("127.0.0.1:5000");
    each_case("manifest", CASES, |g| {
        let valid = valid_image(g);
        through_parsers(&image, &mutated(g, &valid.manifest));
    });
    each_case("index", CASES, |g| {
        let valid = valid_image(g);
        through_parsers(&image, &mutated(g, &valid.index));
    });
    each_case("config", CASES, |g| {
        let valid = valid_image(g);
        let (manifest, _) =
            parse_manifest(&image, &serde_json::to_vec(&valid.manifest).unwrap()).unwrap();
        if let Err(e) = parse_config(&image, &mutated(g, &valid.config), &manifest) {
            assert_clear("config", e);
        }
    });
}

#[test]
fn declared_sizes_past_the_limits_are_refused_before_anything_is_fetched() {
    let image = image_at("127.0.0.1:5000");
    let mut g = Gen(7);
    let valid = valid_image(&mut g);
    let with = |path: &[&str], size: Value| {
        let mut m = valid.manifest.clone();
        let mut node = &mut m;
        for key in path {
            node = match key.parse::<usize>() {
                Ok(i) => &mut node[i],
                Err(_) => &mut node[*key],
            };
        }
        node["size"] = size;
        serde_json::to_vec(&m).unwrap()
    };
    for size in [
        json!(MAX_CONFIG_SIZE + 1),
        json!(1u64 << 40),
        json!(i64::MAX),
        json!(u64::MAX),
    ] {
        let e = parse_manifest(&image, &with(&["config"], size.clone())).unwrap_err();
        assert!(e.to_string().contains("declares"), "config {size}: {e}");
    }
    for size in [json!(i64::MAX as u64 + 1), json!(u64::MAX)] {
        let e = parse_manifest(&image, &with(&["layers", "0"], size.clone())).unwrap_err();
        assert!(e.to_string().contains("declares"), "layer {size}: {e}");
    }
    // Each size fits, their sum does not.
    let mut m = valid.manifest.clone();
    m["layers"] = json!([
        {"mediaType": OCI_LAYER, "digest": digest_of(b"a"), "size": i64::MAX},
        {"mediaType": OCI_LAYER, "digest": digest_of(b"b"), "size": i64::MAX},
    ]);
    let e = parse_manifest(&image, &serde_json::to_vec(&m).unwrap()).unwrap_err();
    assert!(e.to_string().contains("declares"), "{e}");
    // A big layer that fits is streamed, not refused.
    let big = with(&["layers", "0"], json!(1u64 << 40));
    let (_, total) = parse_manifest(&image, &big).unwrap();
    assert!(total > 1 << 40);
}

// ---- whole pulls from a scripted registry ----

/// One scripted HTTP answer.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The Content-Length header sent; `None` sends none (the body ends when the connection
    /// closes).
    content_length: Option<usize>,
}

impl Answer {
    fn ok(body: Vec<u8>, content_type: &str) -> Answer {
        Answer {
            status: 200,
            headers: vec![("Content-Type".into(), content_type.into())],
            content_length: Some(body.len()),
            body,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut head = format!("HTTP/1.1 {} Scripted\r\n", self.status);
        for (k, v) in &self.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(n) = self.content_length {
            head.push_str(&format!("Content-Length: {n}\r\n"));
        }
        head.push_str("Connection: close\r\n\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

/// A registry on loopback answering each `METHOD /path` (query dropped) from a script; anything
/// else is 404. It logs the requests it saw.
struct ScriptedRegistry {
    seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ScriptedRegistry {
    async fn bind() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (listener, addr)
    }

    fn serve(listener: TcpListener, script: HashMap<String, Answer>) -> ScriptedRegistry {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(script);
        let log = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let (script, log) = (script.clone(), log.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                        if head.len() > MAX_REQUEST_HEAD {
                            return;
                        }
                    }
                    let line = String::from_utf8_lossy(&head)
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_owned();
                    let mut parts = line.split(' ');
                    let method = parts.next().unwrap_or_default();
                    let target = parts.next().unwrap_or_default();
                    let key = format!("{method} {}", target.split('?').next().unwrap_or_default());
                    log.lock().unwrap().push(key.clone());
                    let answer = script.get(&key).cloned().unwrap_or(Answer {
                        status: 404,
                        headers: Vec::new(),
                        body: br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"no"}]}"#.to_vec(),
                        content_length: Some(51),
                    });
                    let _ = conn.write_all(&answer.bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        ScriptedRegistry { seen, task }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for ScriptedRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn manifest_path(reference: &str) -> String {
    format!("GET /v2/{REPOSITORY}/manifests/{reference}")
}

fn blob_path(digest: &str) -> String {
    format!("GET /v2/{REPOSITORY}/blobs/{digest}")
}

/// The script of a registry serving `image` correctly, its top document the index or the
/// manifest.
fn faithful_script(image: &Image, via_index: bool) -> HashMap<String, Answer> {
    let config = serde_json::to_vec(&image.config).unwrap();
    let manifest = serde_json::to_vec(&image.manifest).unwrap();
    let index = serde_json::to_vec(&image.index).unwrap();
    let mut script = HashMap::from([
        (
            "GET /v2/".to_owned(),
            Answer::ok(b"{}".to_vec(), "application/json"),
        ),
        (
            blob_path(&digest_of(&config)),
            Answer::ok(config, OCI_CONFIG),
        ),
        (
            manifest_path(&digest_of(&manifest)),
            Answer::ok(manifest.clone(), MEDIA_OCI_MANIFEST),
        ),
    ]);
    let top = if via_index {
        Answer::ok(index, MEDIA_OCI_INDEX)
    } else {
        Answer::ok(manifest, MEDIA_OCI_MANIFEST)
    };
    script.insert(manifest_path(TAG), top);
    for layer in &image.layers {
        script.insert(
            blob_path(&digest_of(layer)),
            Answer::ok(layer.clone(), OCI_LAYER),
        );
    }
    script
}

/// A hostile WWW-Authenticate challenge, most of them pointing at the registry's /token.
fn hostile_challenge(g: &mut Gen, addr: SocketAddr) -> String {
    let realm = format!("http://{addr}/token");
    let choices = [
        format!("Bearer realm=\"{realm}\",service=\"registry\",scope=\"repository:x:pull\""),
        format!("Bearer realm=\"{realm}\""),
        format!("bearer REALM=\"{realm}\", service=\"{}\"", "s".repeat(4096)),
        "Bearer realm=\"\"".to_owned(),
        "Bearer realm=\"not a url\"".to_owned(),
        "Bearer realm=\"ftp://127.0.0.1/\"".to_owned(),
        "Bearer service=\"no realm\"".to_owned(),
        "Bearer realm=\"unterminated".to_owned(),
        "Bearer realm=".to_owned(),
        "Bearer ,,,,,=,=".to_owned(),
        "Basic realm=\"registry\"".to_owned(),
        "Negotiate".to_owned(),
        String::new(),
        format!("Bearer realm=\"{realm}\", {}", "a=b, ".repeat(2000)),
        format!("Digest nonce=\"1\", Bearer realm=\"{realm}\""),
        "\u{e9}".to_owned(),
    ];
    g.pick(&choices)
}

/// A hostile token response.
fn hostile_token(g: &mut Gen) -> Vec<u8> {
    let choices: Vec<Vec<u8>> = vec![
        br#"{"token":"abc"}"#.to_vec(),
        br#"{"access_token":"abc","expires_in":-5}"#.to_vec(),
        br#"{"token":"line\nbreak"}"#.to_vec(),
        br#"{"token":"nul\u0000byte"}"#.to_vec(),
        br#"{"token":"\u007f"}"#.to_vec(),
        br#"{"token":""}"#.to_vec(),
        br#"{"token":5}"#.to_vec(),
        br#"{"token":null}"#.to_vec(),
        br#"{}"#.to_vec(),
        br#"[]"#.to_vec(),
        b"not json".to_vec(),
        format!("{{\"token\":\"{}\"}}", "t".repeat(1 << 20)).into_bytes(),
        // A JWT whose payload is not base64, and one whose claims are nonsense.
        br#"{"token":"a.!!!.c"}"#.to_vec(),
        br#"{"token":"e30.eyJleHAiOi0xfQ.c"}"#.to_vec(),
        br#"{"token":"e30.eyJleHAiOjE4NDQ2NzQ0MDczNzA5NTUxNjE1fQ.c"}"#.to_vec(),
    ];
    g.pick(&choices)
}

/// One way to spoil an answer: status, headers, body, or a Content-Length that lies.
fn spoil(g: &mut Gen, answer: &mut Answer) {
    match g.below(9) {
        0 => {
            answer.status = g.pick(&[
                201, 204, 206, 301, 302, 304, 400, 401, 403, 404, 416, 429, 500, 503, 999,
            ])
        }
        1 => answer.headers.push((
            "Docker-Content-Digest".into(),
            g.pick(&[
                "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                "sha256:zz",
                "md5:00",
                "",
                "sha256:",
            ])
            .into(),
        )),
        2 => answer.content_length = Some(answer.body.len() + 1 + g.below(1 << 30) as usize),
        3 => answer.content_length = Some(g.below(answer.body.len() as u64 + 1) as usize),
        4 => answer.content_length = None,
        5 => {
            // A body far past what any descriptor declares, with no length to warn.
            answer.content_length = None;
            let n = 1 + g.below(4 << 20) as usize;
            let extra = g.bytes(n);
            answer.body.extend(extra);
        }
        6 => answer.headers.push((
            "Content-Type".into(),
            g.pick(&[MEDIA_DOCKER_LIST, MEDIA_OCI_INDEX, "text/html", "\u{1}"])
                .into(),
        )),
        7 => answer.headers.push(("Content-Length".into(), "-1".into())),
        _ => answer
            .body
            .truncate(g.below(answer.body.len() as u64 + 1) as usize),
    }
}

/// Pulls `image_ref` from a registry following `script` into an empty fake backend; fails the
/// test (naming `seed`) if the pull panics or hangs, or leaves a lease behind.
async fn pull_from(
    seed: u64,
    reference: &ImageRef,
) -> (std::result::Result<(), String>, Arc<Fake>) {
    let fake = Arc::new(Fake::default());
    let (cd, image) = (fake.clone(), reference.clone());
    let access = super::Registries::anonymous().access(None);
    let task =
        tokio::spawn(async move { pull(&access, cd.as_ref(), &image, None).await.map(|_| ()) });
    let joined = tokio::time::timeout(PULL_TIMEOUT, task)
        .await
        .unwrap_or_else(|_| panic!("seed {seed:#x}: the pull did not end within {PULL_TIMEOUT:?}"));
    let result = match joined {
        Ok(result) => result,
        Err(e) => panic!("seed {seed:#x}: the pull panicked: {e}"),
    };
    assert_eq!(
        fake.open_leases(),
        0,
        "seed {seed:#x}: the pull kept its lease"
    );
    let result = result.map_err(|e| {
        let status = Status::from(e);
        assert!(
            status.message().len() <= 1024,
            "seed {seed:#x}: {} bytes",
            status.message().len()
        );
        format!("{:?}: {}", status.code(), status.message())
    });
    (result, fake)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faithful_scripted_registry_pulls() {
    for via_index in [false, true] {
        let image = valid_image(&mut Gen(11));
        let (listener, addr) = ScriptedRegistry::bind().await;
        let registry = ScriptedRegistry::serve(listener, faithful_script(&image, via_index));
        let (result, fake) = pull_from(0, &image_at(&addr.to_string())).await;
        assert_eq!(
            result,
            Ok(()),
            "via index {via_index}: {:?}",
            registry.seen()
        );
        assert!(fake
            .images(None)
            .await
            .unwrap()
            .iter()
            .any(|i| i.name.ends_with(&format!("{REPOSITORY}:{TAG}"))));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_declared_huge_is_refused_before_any_byte_is_fetched() {
    for size in [MAX_CONFIG_SIZE + 1, 1 << 40, 1 << 62, u64::MAX] {
        let mut image = valid_image(&mut Gen(13));
        image.manifest["config"]["size"] = json!(size);
        let config_digest = image.manifest["config"]["digest"]
            .as_str()
            .unwrap()
            .to_owned();
        let (listener, addr) = ScriptedRegistry::bind().await;
        let registry = ScriptedRegistry::serve(listener, faithful_script(&image, false));
        let (result, _) = pull_from(size, &image_at(&addr.to_string())).await;
        let err = result.unwrap_err();
        assert!(err.contains("declares"), "{size}: {err}");
        assert!(
            !registry.seen().contains(&blob_path(&config_digest)),
            "{size}: the config was fetched: {:?}",
            registry.seen()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_longer_or_shorter_than_declared_is_refused() {
    for (declared_delta, label) in [(-1i64, "longer"), (1, "shorter")] {
        let mut image = valid_image(&mut Gen(17));
        let config_len = serde_json::to_vec(&image.config).unwrap().len() as i64;
        image.manifest["config"]["size"] = json!(config_len + declared_delta);
        let (listener, addr) = ScriptedRegistry::bind().await;
        let _registry = ScriptedRegistry::serve(listener, faithful_script(&image, false));
        let (result, _) = pull_from(0, &image_at(&addr.to_string())).await;
        let err = result.unwrap_err();
        assert!(
            err.contains("descriptor"),
            "body {label} than declared: {err}"
        );
    }
}

/// A registry whose token is no valid header value (a registry client that builds the
/// Authorization header blindly panics on it): the pull fails cleanly, its lease released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_is_no_header_value_fails_the_pull_cleanly() {
    let image = valid_image(&mut Gen(19));
    let (listener, addr) = ScriptedRegistry::bind().await;
    let mut script = faithful_script(&image, false);
    // The manifest asks for a token (a pull asks for it first, before any ping of /v2/).
    script.insert(
        manifest_path(TAG),
        Answer {
            status: 401,
            headers: vec![(
                "WWW-Authenticate".into(),
                format!("Bearer realm=\"http://{addr}/token\",service=\"r\""),
            )],
            body: Vec::new(),
            content_length: Some(0),
        },
    );
    script.insert(
        "GET /token".into(),
        Answer::ok(br#"{"token":"line\nbreak"}"#.to_vec(), "application/json"),
    );
    let _registry = ScriptedRegistry::serve(listener, script);
    let (result, _) = pull_from(0, &image_at(&addr.to_string())).await;
    let err = result.unwrap_err();
    assert!(err.contains("not a valid HTTP header value"), "{err}");
}

/// The same registry as the target of a push (ExportSnapshot): the push fails cleanly too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_to_a_registry_whose_token_is_no_header_value_fails_cleanly() {
    let image = valid_image(&mut Gen(23));
    let fake = Fake::default();
    let manifest = serde_json::to_vec(&image.manifest).unwrap();
    let digest = digest_of(&manifest);
    let lease = fake.lease("test").await.unwrap();
    super::content::write_bytes(&fake, &lease, &digest, manifest.into(), HashMap::new())
        .await
        .unwrap();
    let (listener, addr) = ScriptedRegistry::bind().await;
    let challenge = Answer {
        status: 401,
        headers: vec![(
            "WWW-Authenticate".into(),
            format!("Bearer realm=\"http://{addr}/token\""),
        )],
        body: Vec::new(),
        content_length: Some(0),
    };
    let script = HashMap::from([
        ("GET /v2/".to_owned(), challenge),
        (
            "GET /token".to_owned(),
            Answer::ok(br#"{"token":"line\nbreak"}"#.to_vec(), "application/json"),
        ),
    ]);
    let _registry = ScriptedRegistry::serve(listener, script);
    let target = image_at(&addr.to_string());
    let access = super::Registries::anonymous().access(None);
    let pushed = tokio::spawn(async move { super::push(&access, &fake, &digest, &target).await })
        .await
        .expect("the push does not panic");
    let err = pushed.unwrap_err();
    assert!(matches!(err, Error::Registry(_)), "{err:?}");
    assert!(
        err.to_string().contains("not a valid HTTP header value"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_from_a_hostile_registry_end_in_an_image_or_a_clear_error() {
    let mut outcomes: HashMap<String, usize> = HashMap::new();
    for case in 0..PULL_CASES {
        let seed = 0x9011_0000 + case as u64 * 104_729;
        let mut g = Gen(seed);
        let image = valid_image(&mut g);
        let (listener, addr) = ScriptedRegistry::bind().await;
        let via_index = g.one_in(2);
        let mut script = faithful_script(&image, via_index);
        if g.one_in(3) {
            script.insert(
                "GET /v2/".into(),
                Answer {
                    status: g.pick(&[200, 401, 401, 403]),
                    headers: vec![("WWW-Authenticate".into(), hostile_challenge(&mut g, addr))],
                    body: Vec::new(),
                    content_length: Some(0),
                },
            );
            script.insert(
                "GET /token".into(),
                Answer::ok(hostile_token(&mut g), "application/json"),
            );
        }
        // Rewrite some documents, then spoil some answers.
        let config = serde_json::to_vec(&image.config).unwrap();
        let manifest = serde_json::to_vec(&image.manifest).unwrap();
        let documents = [
            (
                manifest_path(TAG),
                if via_index {
                    &image.index
                } else {
                    &image.manifest
                },
            ),
            (manifest_path(&digest_of(&manifest)), &image.manifest),
            (blob_path(&digest_of(&config)), &image.config),
        ];
        for (path, doc) in documents {
            if g.one_in(3) {
                let answer = script.get_mut(&path).unwrap();
                answer.body = mutated(&mut g, doc);
                answer.content_length = Some(answer.body.len());
            }
        }
        let mut paths: Vec<String> = script.keys().cloned().collect();
        paths.sort();
        for path in paths {
            if g.one_in(5) {
                spoil(&mut g, script.get_mut(&path).unwrap());
            }
        }
        let _registry = ScriptedRegistry::serve(listener, script);
        let (result, _) = pull_from(seed, &image_at(&addr.to_string())).await;
        let outcome = match result {
            Ok(()) => "ok".to_owned(),
            Err(e) => e.split(':').next().unwrap_or_default().to_owned(),
        };
        *outcomes.entry(outcome).or_default() += 1;
    }
    // Some cases stay faithful enough to pull, most do not: both paths ran.
    assert!(outcomes.get("ok").copied().unwrap_or(0) > 0, "{outcomes:?}");
    assert!(outcomes.len() > 1, "{outcomes:?}");
    eprintln!("hostile pulls by outcome: {outcomes:?}");
}
