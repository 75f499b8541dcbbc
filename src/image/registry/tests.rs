//! The authorization flows a session speaks, against a registry of a few lines of HTTP that
//! checks what it is sent: Basic, a bearer token traded for a user and password or for an
//! identity token, and the refusals (wrong credentials, 403, a realm at the metadata address).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::{Actions, AuthFile, Credential, Registries};
use crate::error::Error;

/// A request as the test registry saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    target: String,
    headers: HashMap<String, String>,
    body: String,
}

type Handler = dyn Fn(&Seen, &str) -> (u16, Vec<(String, String)>, String) + Send + Sync;

/// Serves each request through `handler(request, own address)`; returns the address and the
/// log of requests.
async fn serve(handler: Arc<Handler>) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let log: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let (own, seen) = (addr.clone(), log.clone());
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let (handler, seen, own) = (handler.clone(), seen.clone(), own.clone());
            tokio::spawn(async move {
                let mut data = Vec::new();
                let mut buf = [0u8; 4096];
                let head_end = loop {
                    if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => data.extend_from_slice(&buf[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&data[..head_end]).to_string();
                let mut lines = head.lines();
                let mut first = lines.next().unwrap_or_default().split_whitespace();
                let (method, target) = (
                    first.next().unwrap_or_default().to_string(),
                    first.next().unwrap_or_default().to_string(),
                );
                let headers: HashMap<String, String> = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                    .collect();
                let length: usize = headers
                    .get("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                while data.len() < head_end + length {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => data.extend_from_slice(&buf[..n]),
                    }
                }
                let request = Seen {
                    method,
                    target,
                    headers,
                    body: String::from_utf8_lossy(&data[head_end..]).to_string(),
                };
                let (status, headers, body) = handler(&request, &own);
                seen.lock().unwrap().push(request);
                let mut out = format!("HTTP/1.1 {status} Test\r\n");
                for (k, v) in headers {
                    out.push_str(&format!("{k}: {v}\r\n"));
                }
                out.push_str(&format!(
                    "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                ));
                let _ = conn.write_all(out.as_bytes()).await;
            });
        }
    });
    (addr, log)
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

fn unauthorized(challenge: String) -> (u16, Vec<(String, String)>, String) {
    (
        401,
        vec![("WWW-Authenticate".into(), challenge)],
        r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#.into(),
    )
}

/// A registry whose manifest `repo/manifests/t` needs `Bearer good-token`, handed out at its
/// `/token` for `alice:pw` (Basic) or for the refresh token `refresh-1` (POST, OAuth2 form).
fn bearer_registry() -> Arc<Handler> {
    Arc::new(|req: &Seen, own: &str| {
        let auth = req
            .headers
            .get("authorization")
            .cloned()
            .unwrap_or_default();
        if req.target.starts_with("/token") {
            let form_ok = req.method == "POST"
                && req.body.contains("grant_type=refresh_token")
                && req.body.contains("refresh_token=refresh-1")
                && req.body.contains("scope=repository%3Arepo%3Apull");
            let basic_ok = req.method == "GET"
                && auth == basic("alice", "pw")
                && req.target.contains("scope=repository%3Arepo%3Apull")
                && req.target.contains("service=test-registry");
            return if form_ok {
                (200, vec![], r#"{"access_token":"good-token"}"#.into())
            } else if basic_ok {
                (200, vec![], r#"{"token":"good-token"}"#.into())
            } else {
                (
                    401,
                    vec![],
                    r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#.into(),
                )
            };
        }
        if auth == "Bearer good-token" {
            return (200, vec![], "manifest".into());
        }
        unauthorized(format!(
            "Bearer realm=\"http://{own}/token\",service=\"test-registry\",scope=\"repository:repo:pull\""
        ))
    })
}

fn tenant_file(host: &str, entry: serde_json::Value) -> Arc<AuthFile> {
    let json = serde_json::json!({ "auths": { host: entry } });
    Arc::new(AuthFile::parse(&serde_json::to_vec(&json).unwrap()).unwrap())
}

/// GETs `repo/manifests/t` through a pull session with `auth` as the caller's credentials.
async fn get_manifest(host: &str, auth: Option<Arc<AuthFile>>) -> Result<String, Error> {
    let access = Registries::anonymous().access(auth);
    let endpoint = access
        .pull_endpoints(host, "test")
        .await?
        .pop()
        .expect("the host itself");
    let session = access.session(endpoint, "repo", Actions::Pull, "test".into());
    let url = session.url("manifests/t");
    let response = session.send(&|c| c.get(url.clone())).await?;
    assert_eq!(response.status(), 200);
    Ok(response.text().await.unwrap())
}

#[tokio::test]
async fn a_bearer_token_is_traded_for_a_user_and_password() {
    let (host, log) = serve(bearer_registry()).await;
    let auth = tenant_file(
        &host,
        serde_json::json!({"username": "alice", "password": "pw"}),
    );
    assert_eq!(get_manifest(&host, Some(auth)).await.unwrap(), "manifest");
    let methods: Vec<String> = log
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.method.clone())
        .collect();
    assert_eq!(methods, ["GET", "GET", "GET"], "challenge, token, retry");
}

#[tokio::test]
async fn a_bearer_token_is_traded_for_an_identity_token() {
    let (host, log) = serve(bearer_registry()).await;
    let auth = tenant_file(&host, serde_json::json!({"identitytoken": "refresh-1"}));
    assert_eq!(get_manifest(&host, Some(auth)).await.unwrap(), "manifest");
    assert!(log.lock().unwrap().iter().any(|s| s.method == "POST"));
}

#[tokio::test]
async fn wrong_or_missing_credentials_are_unauthenticated_with_the_registrys_reason() {
    let (host, _log) = serve(bearer_registry()).await;
    let wrong = tenant_file(
        &host,
        serde_json::json!({"username": "alice", "password": "no"}),
    );
    for auth in [Some(wrong), None] {
        match get_manifest(&host, auth).await {
            Err(Error::Unauthenticated(why)) => assert!(why.contains("bad credentials"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn basic_challenges_get_the_user_and_password_and_403_is_permission_denied() {
    let handler: Arc<Handler> = Arc::new(|req: &Seen, _own: &str| {
        match req.headers.get("authorization").map(String::as_str) {
            Some(a) if a == basic("bob", "hunter2") => (200, vec![], "manifest".into()),
            Some(a) if a == basic("eve", "x") => (
                403,
                vec![],
                r#"{"errors":[{"code":"DENIED","message":"not yours"}]}"#.into(),
            ),
            _ => unauthorized("Basic realm=\"test\"".into()),
        }
    });
    let (host, _log) = serve(handler).await;
    let bob = tenant_file(&host, serde_json::json!({"auth": "Ym9iOmh1bnRlcjI="}));
    assert_eq!(get_manifest(&host, Some(bob)).await.unwrap(), "manifest");
    let eve = tenant_file(
        &host,
        serde_json::json!({"username": "eve", "password": "x"}),
    );
    match get_manifest(&host, Some(eve)).await {
        Err(Error::PermissionDenied(why)) => assert!(why.contains("not yours"), "{why}"),
        other => panic!("{other:?}"),
    }
    match get_manifest(&host, None).await {
        Err(Error::Unauthenticated(why)) => assert!(why.contains("--registry-auth"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_realm_at_the_metadata_address_is_refused_before_it_is_contacted() {
    let handler: Arc<Handler> = Arc::new(|_req: &Seen, _own: &str| {
        unauthorized("Bearer realm=\"http://169.254.169.254/latest/api/token\"".into())
    });
    let (host, log) = serve(handler).await;
    match get_manifest(&host, None).await {
        Err(Error::PermissionDenied(why)) => assert!(why.contains("metadata"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        log.lock().unwrap().len(),
        1,
        "only the challenge was fetched"
    );
}

#[tokio::test]
async fn hosts_off_the_allow_list_are_refused_before_any_connection() {
    let settings = super::RegistrySettings {
        allow: Some(vec!["docker.io".into()]),
        ..Default::default()
    };
    let access = Arc::new(Registries::new(settings).unwrap()).access(None);
    match access.pull_endpoints("127.0.0.1:1", "test").await {
        Err(Error::PermissionDenied(why)) => assert!(why.contains("--registry-allow"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(access.pull_endpoints("docker.io", "test").await.is_ok());
}

/// ExportSnapshot's push through a bearer registry: the token is asked for `pull,push` before
/// the first upload, and every request after carries it.
#[tokio::test]
async fn a_push_negotiates_a_pull_and_push_token_before_its_uploads() {
    use crate::runtime::{fake::Fake, Store};
    let layer = b"layer bytes".to_vec();
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
            .to_vec();
    let digest = |b: &[u8]| {
        format!(
            "sha256:{}",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b))
        )
    };
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": crate::image::MEDIA_OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest(&layer), "size": layer.len()}],
    }))
    .unwrap();
    let fake = Fake::default();
    let lease = fake.lease("test").await.unwrap();
    for blob in [&layer, &config, &manifest] {
        crate::image::content::write_bytes(
            &fake,
            &lease,
            &digest(blob),
            blob.clone().into(),
            HashMap::new(),
        )
        .await
        .unwrap();
    }
    let uploaded: Arc<Mutex<Vec<String>>> = Arc::default();
    let seen_uploads = uploaded.clone();
    let handler: Arc<Handler> = Arc::new(move |req: &Seen, own: &str| {
        let auth = req
            .headers
            .get("authorization")
            .cloned()
            .unwrap_or_default();
        if req.target.starts_with("/token") {
            return if auth == basic("alice", "pw")
                && req
                    .target
                    .contains("scope=repository%3Ateam%2Fapp%3Apull%2Cpush")
            {
                (200, vec![], r#"{"token":"push-token"}"#.into())
            } else {
                (
                    401,
                    vec![],
                    r#"{"errors":[{"code":"DENIED","message":"no"}]}"#.into(),
                )
            };
        }
        if auth != "Bearer push-token" {
            return unauthorized(format!(
                "Bearer realm=\"http://{own}/token\",service=\"reg\""
            ));
        }
        let path = req.target.split('?').next().unwrap_or_default();
        match (req.method.as_str(), path) {
            ("GET", "/v2/") => (200, vec![], "{}".into()),
            ("HEAD", _) => (404, vec![], String::new()),
            ("POST", "/v2/team/app/blobs/uploads/") => (
                202,
                vec![("Location".into(), "/v2/team/app/blobs/uploads/u1".into())],
                String::new(),
            ),
            ("PUT", "/v2/team/app/blobs/uploads/u1") => {
                seen_uploads.lock().unwrap().push(req.body.clone());
                (201, vec![], String::new())
            }
            ("PUT", "/v2/team/app/manifests/v1") => (201, vec![], String::new()),
            _ => (
                400,
                vec![],
                format!("unexpected {} {}", req.method, req.target),
            ),
        }
    });
    let (host, log) = serve(handler).await;
    let auth = tenant_file(
        &host,
        serde_json::json!({"username": "alice", "password": "pw"}),
    );
    let access = Registries::anonymous().access(Some(auth));
    let target = crate::image::ImageRef::parse("image", &format!("{host}/team/app:v1")).unwrap();
    let pushed = crate::image::push(&access, &fake, &digest(&manifest), &target)
        .await
        .unwrap();
    assert_eq!(pushed, digest(&manifest));
    let mut bodies = uploaded.lock().unwrap().clone();
    bodies.sort();
    // Sorted: the layer's bytes, then the config's JSON.
    let expected = [
        String::from_utf8(layer).unwrap(),
        String::from_utf8(config).unwrap(),
    ];
    assert_eq!(bodies, expected);
    let manifest_put = log
        .lock()
        .unwrap()
        .iter()
        .any(|s| s.method == "PUT" && s.target == "/v2/team/app/manifests/v1");
    assert!(manifest_put);
}

/// A self-signed CA certificate (its key thrown away): only ever parsed here.
const UNIT_CA_PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIBmDCCAT2gAwIBAgIUN4LO1qu+Xn7ggcNv6dKK6mdUMJowCgYIKoZIzj0EAwIw\nIDEeMBwGA1UEAwwVc2FuZGJveGQtdW5pdC10ZXN0LWNhMCAXDTI2MTIwODAzNDQw\nM1oYDzIxMjYxMTE0MDM0NDAzWjAgMR4wHAYDVQQDDBVzYW5kYm94ZC11bml0LXRl\nc3QtY2EwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAATRlfURMtOAIvmB+rMKfl/9\neeM++TCMaRzGi8aT2dgi9OLSYyAbyBsq/MWXa3YorESotn0+icub5Y0OrBelxOlg\no1MwUTAdBgNVHQ4EFgQULJVZ201yTh9/JdAOxshfYoXW1xMwHwYDVR0jBBgwFoAU\nLJVZ201yTh9/JdAOxshfYoXW1xMwDwYDVR0TAQH/BAUwAwEB/zAKBggqhkjOPQQD\nAgNJADBGAiEA6rwpW7b2/Y6MnF33xKiwflH9+i1buPM3lJnxf5yBcBACIQDRPyt0\nBEtrolCtvurSQTuWEXDLqxXAbsFtjkzpzSdOtQ==\n-----END CERTIFICATE-----\n";

#[tokio::test]
async fn plain_http_is_for_insecure_hosts_and_loopback_without_a_ca_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, UNIT_CA_PEM).unwrap();
    let settings = super::RegistrySettings {
        insecure: vec!["10.0.0.5:5000".into()],
        cas: vec![("127.0.0.1:5443".into(), ca)],
        ..Default::default()
    };
    let access = Arc::new(Registries::new(settings).unwrap()).access(None);
    let base = |host: &'static str| {
        let access = access.clone();
        async move {
            let endpoints = access.pull_endpoints(host, "test").await.unwrap();
            endpoints.last().unwrap().base.to_string()
        }
    };
    assert_eq!(base("10.0.0.5:5000").await, "http://10.0.0.5:5000/");
    assert_eq!(base("127.0.0.1:5000").await, "http://127.0.0.1:5000/");
    assert_eq!(base("localhost:5000").await, "http://localhost:5000/");
    assert_eq!(base("127.0.0.1:5443").await, "https://127.0.0.1:5443/");
    assert_eq!(
        base("registry.example.com").await,
        "https://registry.example.com/"
    );
    assert_eq!(base("docker.io").await, "https://registry-1.docker.io/");
}

#[test]
fn a_tenants_credentials_file_is_read_again_when_it_changes_and_kept_when_it_breaks() {
    let registries = Registries::anonymous();
    assert!(registries.tenant_auth(None).unwrap().is_none());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alice.json");
    let missing = registries.tenant_auth(Some(&path)).unwrap_err();
    assert!(missing.to_string().contains("alice.json"), "{missing}");
    let write = |user: &str| {
        let tmp = dir.path().join("tmp.json");
        std::fs::write(
            &tmp,
            format!(r#"{{"auths":{{"r.example":{{"username":"{user}","password":"p"}}}}}}"#),
        )
        .unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    };
    let user = |auth: &AuthFile| match auth.get("r.example") {
        Some(Credential::Basic { username, .. }) => username.clone(),
        other => panic!("{other:?}"),
    };
    write("first");
    let auth = registries.tenant_auth(Some(&path)).unwrap().unwrap();
    assert_eq!(user(&auth), "first");
    write("second-user");
    let auth = registries.tenant_auth(Some(&path)).unwrap().unwrap();
    assert_eq!(user(&auth), "second-user");
    std::fs::write(&path, b"{ broken").unwrap();
    let auth = registries.tenant_auth(Some(&path)).unwrap().unwrap();
    assert_eq!(user(&auth), "second-user", "the last good version stays");
}
