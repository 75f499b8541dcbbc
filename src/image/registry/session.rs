//! One repository at one registry endpoint: requests with the authorization the registry asks
//! for (Basic, or a bearer token from its realm), every wait bounded by the read timeout, every
//! body read bounded and blobs verified against their digests as they stream.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures::Stream;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, WWW_AUTHENTICATE};
use reqwest::{RequestBuilder, Response, StatusCode, Url};
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;

use super::auth::{parse_challenge, parse_token, Challenge, Credential};
use super::guard::{check_literal, check_realm, GuardedResolver};
use super::{Actions, Endpoint, RegistrySettings};
use crate::error::{Error, Result};
use crate::net::policy::Ipv4Net;

/// Bytes a blob's stream gathers before it yields them: each chunk is one round trip of
/// containerd's content write, and the network hands over a few KiB at a time.
const BLOB_CHUNK: usize = 1 << 20;
/// Most redirects followed for one request.
const MAX_REDIRECTS: usize = 10;
/// Largest token answer read.
const MAX_TOKEN_ANSWER: u64 = 1 << 20;
/// Largest error body read for its reason.
const MAX_ERROR_BODY: u64 = 16 << 10;
/// Longest registry reason quoted in a status message.
const MAX_REASON: usize = 300;
/// Who sandboxd says it is, and the OAuth2 client id of identity-token exchanges.
const USER_AGENT: &str = concat!("sandboxd/", env!("CARGO_PKG_VERSION"));

/// An HTTP client with sandboxd's limits: connect timeout, guarded name resolution and
/// redirects, and `roots` trusted beside the system's.
pub(super) fn build_client(
    settings: &RegistrySettings,
    roots: Vec<reqwest::Certificate>,
) -> std::result::Result<reqwest::Client, String> {
    let denied = settings.denied_networks.clone();
    let redirects = reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() >= MAX_REDIRECTS {
            return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
        }
        // A redirect may reach loopback only from loopback.
        let from_loopback = attempt
            .previous()
            .first()
            .and_then(|u| u.host_str())
            .is_some_and(super::is_loopback_host);
        match check_literal(attempt.url(), from_loopback, &denied) {
            Ok(()) => attempt.follow(),
            Err(why) => attempt.error(format!("redirect refused: {why}")),
        }
    });
    let mut builder = reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .connect_timeout(settings.connect_timeout)
        .read_timeout(settings.read_timeout)
        .redirect(redirects)
        .dns_resolver(Arc::new(GuardedResolver));
    if !roots.is_empty() {
        builder = builder.tls_certs_merge(roots);
    }
    builder.build().map_err(|e| error_chain(&e))
}

/// `e` with its causes, which reqwest keeps out of its own message.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// A builder of one request, called again when it must be re-sent with new authorization.
pub(super) type MakeRequest<'a> = &'a (dyn Fn(&reqwest::Client) -> RequestBuilder + Sync);

/// A repository at an endpoint, with the authorization negotiated so far.
pub(crate) struct Session {
    client: reqwest::Client,
    endpoint: Endpoint,
    repository: String,
    actions: Actions,
    credential: Option<Credential>,
    connect_timeout: Duration,
    read_timeout: Duration,
    denied: Vec<Ipv4Net>,
    /// What the session is for, in messages (`127.0.0.1:5000/app:v1`, `pushing to ...`).
    what: String,
    authorization: Mutex<Option<HeaderValue>>,
    /// One token fetch at a time; the others then use its result.
    authorizing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("endpoint", &self.endpoint.base.as_str())
            .field("repository", &self.repository)
            .finish_non_exhaustive()
    }
}

impl Session {
    pub(super) fn new(
        client: reqwest::Client,
        settings: &RegistrySettings,
        endpoint: Endpoint,
        repository: &str,
        actions: Actions,
        credential: Option<Credential>,
        what: String,
    ) -> Session {
        Session {
            client,
            endpoint,
            repository: repository.to_string(),
            actions,
            credential,
            connect_timeout: settings.connect_timeout,
            read_timeout: settings.read_timeout,
            denied: settings.denied_networks.clone(),
            what,
            authorization: Mutex::new(None),
            authorizing: tokio::sync::Mutex::new(()),
        }
    }

    /// What the session is for, in messages.
    pub fn what(&self) -> &str {
        &self.what
    }

    /// Whether the session goes to a mirror.
    pub fn is_mirror(&self) -> bool {
        self.endpoint.mirror
    }

    /// The endpoint's base URL, for messages.
    pub fn endpoint(&self) -> &str {
        self.endpoint.base.as_str()
    }

    /// `<base>/v2/<repository>/<path>`.
    pub fn url(&self, path: &str) -> Url {
        let mut url = self.endpoint.base.clone();
        let base = url.path().trim_end_matches('/').to_string();
        url.set_path(&format!("{base}/v2/{}/{path}", self.repository));
        url
    }

    /// `<base>/v2/`: the API root, where authorization is negotiated up front.
    fn root_url(&self) -> Url {
        let mut url = self.endpoint.base.clone();
        let base = url.path().trim_end_matches('/').to_string();
        url.set_path(&format!("{base}/v2/"));
        url
    }

    /// A location the registry answered (an upload URL), resolved against the endpoint and
    /// checked like a redirect.
    pub fn location(&self, location: &str) -> Result<Url> {
        let url = self.endpoint.base.join(location).map_err(|e| {
            Error::Registry(format!(
                "{}: bad upload location {location:?}: {e}",
                self.what
            ))
        })?;
        check_literal(&url, self.endpoint.loopback, &self.denied)
            .map_err(|why| Error::PermissionDenied(format!("{}: {why}", self.what)))?;
        Ok(url)
    }

    fn current_authorization(&self) -> Option<HeaderValue> {
        self.authorization
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sends the request `make` builds; on 401 negotiates authorization and sends it once
    /// more. 401 then is UNAUTHENTICATED and 403 PERMISSION_DENIED, with the registry's reason;
    /// any other answer is the caller's to judge.
    pub async fn send(&self, make: MakeRequest<'_>) -> Result<Response> {
        let used = self.current_authorization();
        let response = self.send_once(make, used.clone()).await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return self.refuse_forbidden(response).await;
        }
        let challenge = response
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let reason = self.reason(response).await;
        self.authorize(challenge.as_deref(), used, &reason).await?;
        let response = self.send_once(make, self.current_authorization()).await?;
        if response.status() == StatusCode::UNAUTHORIZED {
            let reason = self.reason(response).await;
            return Err(Error::Unauthenticated(format!(
                "{}: registry {} refused {}: {reason}",
                self.what,
                self.endpoint.host,
                self.credential_words()
            )));
        }
        self.refuse_forbidden(response).await
    }

    /// Negotiates authorization before a request whose body cannot be sent twice (a blob
    /// upload): `GET /v2/`, and on 401 the challenge it answers.
    pub async fn authorize_up_front(&self) -> Result<()> {
        let url = self.root_url();
        let response = self.send(&|c| c.get(url.clone())).await?;
        if !response.status().is_success() {
            return Err(self.unexpected(response, "the API root").await);
        }
        Ok(())
    }

    async fn send_once(
        &self,
        make: MakeRequest<'_>,
        authorization: Option<HeaderValue>,
    ) -> Result<Response> {
        let mut request = make(&self.client);
        if let Some(value) = authorization {
            request = request.header(AUTHORIZATION, value);
        }
        self.wait(request.send()).await
    }

    /// `sent`, bounded by the connect and read timeouts.
    async fn wait(
        &self,
        sent: impl std::future::Future<Output = reqwest::Result<Response>>,
    ) -> Result<Response> {
        let limit = self.connect_timeout + self.read_timeout;
        match tokio::time::timeout(limit, sent).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(e)) => Err(self.transport(&e)),
            Err(_) => Err(self.stalled(limit)),
        }
    }

    fn stalled(&self, limit: Duration) -> Error {
        Error::Registry(format!(
            "{}: {} sent nothing for {limit:?} (--registry-read-timeout)",
            self.what, self.endpoint.host
        ))
    }

    fn transport(&self, e: &reqwest::Error) -> Error {
        if e.is_timeout() {
            return self.stalled(self.read_timeout);
        }
        Error::Registry(format!(
            "{}: cannot reach {}: {}",
            self.what,
            self.endpoint.host,
            error_chain(e)
        ))
    }

    fn credential_words(&self) -> &'static str {
        match self.credential {
            Some(_) => "the credentials in --registry-auth",
            None => "anonymous access (no credentials for it in --registry-auth)",
        }
    }

    async fn refuse_forbidden(&self, response: Response) -> Result<Response> {
        if response.status() != StatusCode::FORBIDDEN {
            return Ok(response);
        }
        let reason = self.reason(response).await;
        Err(Error::PermissionDenied(format!(
            "{}: registry {} denies {}: {reason}",
            self.what,
            self.endpoint.host,
            self.credential_words()
        )))
    }

    /// An error for an answer the caller did not expect, with the registry's reason.
    pub async fn unexpected(&self, response: Response, what: &str) -> Error {
        let status = response.status();
        let reason = self.reason(response).await;
        Error::Registry(format!(
            "{}: {what}: registry {} answered {status}: {reason}",
            self.what, self.endpoint.host
        ))
    }

    /// The registry's reason for an error answer: its `errors` document, else its text, cut.
    pub async fn reason(&self, response: Response) -> String {
        let status = response.status();
        let body = self
            .read_bounded(response, MAX_ERROR_BODY, "an error answer")
            .await
            .unwrap_or_default();
        #[derive(serde::Deserialize)]
        struct Errors {
            errors: Vec<Entry>,
        }
        #[derive(serde::Deserialize)]
        struct Entry {
            #[serde(default)]
            code: String,
            #[serde(default)]
            message: String,
        }
        let text = match serde_json::from_slice::<Errors>(&body) {
            Ok(errors) if !errors.errors.is_empty() => errors
                .errors
                .iter()
                .map(|e| format!("{} {}", e.code, e.message).trim().to_string())
                .collect::<Vec<_>>()
                .join("; "),
            _ => String::from_utf8_lossy(&body)
                .chars()
                .filter(|c| !c.is_control())
                .collect::<String>()
                .trim()
                .to_string(),
        };
        let text = if text.is_empty() {
            status.to_string()
        } else {
            text
        };
        match text.char_indices().nth(MAX_REASON) {
            Some((cut, _)) => format!("{}…", &text[..cut]),
            None => text,
        }
    }

    /// Reads a whole body of at most `max` bytes: a longer declared length is refused before
    /// reading, a longer body when it goes past; memory grows only with what arrives.
    pub async fn read_bounded(
        &self,
        mut response: Response,
        max: u64,
        what: &str,
    ) -> Result<Vec<u8>> {
        let too_long = || {
            Error::Registry(format!(
                "{}: {what} is longer than the {max} bytes sandboxd reads",
                self.what
            ))
        };
        if declared_length(&response).is_some_and(|n| n > max) {
            return Err(too_long());
        }
        let mut out = Vec::new();
        loop {
            let chunk = match tokio::time::timeout(self.read_timeout, response.chunk()).await {
                Ok(Ok(Some(chunk))) => chunk,
                Ok(Ok(None)) => return Ok(out),
                Ok(Err(e)) => return Err(self.transport(&e)),
                Err(_) => return Err(self.stalled(self.read_timeout)),
            };
            if out.len() as u64 + chunk.len() as u64 > max {
                return Err(too_long());
            }
            out.extend_from_slice(&chunk);
        }
    }

    /// Negotiates authorization for `challenge` unless another request did since `used` was
    /// sent.
    async fn authorize(
        &self,
        challenge: Option<&str>,
        used: Option<HeaderValue>,
        reason: &str,
    ) -> Result<()> {
        let _one_at_a_time = self.authorizing.lock().await;
        if self.current_authorization() != used {
            return Ok(());
        }
        let host = &self.endpoint.host;
        let value = match challenge.and_then(parse_challenge) {
            None => {
                return Err(Error::Unauthenticated(format!(
                    "{}: registry {host} asks for authentication sandboxd does not speak \
                     ({:?}): {reason}",
                    self.what,
                    challenge.unwrap_or("no WWW-Authenticate header")
                )))
            }
            Some(Challenge::Basic) => match &self.credential {
                Some(Credential::Basic { username, password }) if used.is_none() => {
                    basic_header(username, password)
                }
                Some(Credential::Basic { .. }) => {
                    return Err(Error::Unauthenticated(format!(
                        "{}: registry {host} refused the credentials in --registry-auth: {reason}",
                        self.what
                    )))
                }
                _ => {
                    return Err(Error::Unauthenticated(format!(
                        "{}: registry {host} requires a user name and password, and \
                         --registry-auth has none for it: {reason}",
                        self.what
                    )))
                }
            },
            Some(Challenge::Bearer { realm, service, .. }) => {
                self.fetch_token(&realm, service.as_deref()).await?
            }
        };
        let value = HeaderValue::from_str(&value).map_err(|_| {
            Error::Registry(format!(
                "{}: registry {host}'s token is not a valid HTTP header value",
                self.what
            ))
        })?;
        *self.authorization.lock().unwrap_or_else(|p| p.into_inner()) = Some(value);
        Ok(())
    }

    /// A bearer token from `realm` for this repository, traded for the session's credential
    /// (none: anonymous). Returns the `Authorization` value.
    async fn fetch_token(&self, realm: &str, service: Option<&str>) -> Result<String> {
        let mut url = check_realm(
            &self.endpoint.base,
            self.endpoint.loopback,
            realm,
            &self.denied,
        )
        .await
        .map_err(|why| {
            Error::PermissionDenied(format!(
                "{}: registry {}'s token realm is refused: {why}",
                self.what, self.endpoint.host
            ))
        })?;
        let scope = format!(
            "repository:{}:{}",
            self.repository,
            match self.actions {
                Actions::Pull => "pull",
                Actions::Push => "pull,push",
            }
        );
        let request = match &self.credential {
            Some(Credential::IdentityToken(token)) => {
                let mut form = url::form_urlencoded::Serializer::new(String::new());
                form.append_pair("grant_type", "refresh_token")
                    .append_pair("refresh_token", token)
                    .append_pair("client_id", "sandboxd")
                    .append_pair("scope", &scope);
                if let Some(service) = service {
                    form.append_pair("service", service);
                }
                self.client
                    .post(url.clone())
                    .header(
                        reqwest::header::CONTENT_TYPE,
                        "application/x-www-form-urlencoded",
                    )
                    .body(form.finish())
            }
            credential => {
                {
                    let mut query = url.query_pairs_mut();
                    if let Some(service) = service {
                        query.append_pair("service", service);
                    }
                    query.append_pair("scope", &scope);
                }
                let request = self.client.get(url.clone());
                match credential {
                    Some(Credential::Basic { username, password }) => {
                        request.header(AUTHORIZATION, basic_header(username, password))
                    }
                    _ => request,
                }
            }
        };
        let response = self.wait(request.send()).await?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            let reason = self.reason(response).await;
            return Err(Error::Unauthenticated(format!(
                "{}: the token service of registry {} refused {}: {reason}",
                self.what,
                self.endpoint.host,
                self.credential_words()
            )));
        }
        if !status.is_success() {
            return Err(self.unexpected(response, "the token service").await);
        }
        let body = self
            .read_bounded(response, MAX_TOKEN_ANSWER, "the token answer")
            .await?;
        let token = parse_token(&body).map_err(|why| {
            Error::Registry(format!(
                "{}: registry {}'s token service: {why}",
                self.what, self.endpoint.host
            ))
        })?;
        Ok(format!("Bearer {token}"))
    }
}

fn basic_header(username: &str, password: &str) -> String {
    let pair = format!("{username}:{password}");
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

/// The Content-Length an answer declares, if it declares one that parses.
pub(crate) fn declared_length(response: &Response) -> Option<u64> {
    response
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// A blob body as a stream that ends in an error unless it is exactly `size` bytes whose
/// sha256 is `digest`; each chunk waits at most the read timeout, and a pull that is called
/// off (`cancel` set) ends it at once.
pub(crate) struct BlobBody {
    response: Response,
    read_timeout: Duration,
    what: String,
    host: String,
    digest: String,
    size: u64,
    seen: u64,
    hasher: Sha256,
    cancel: watch::Receiver<bool>,
    /// The body has ended; only the verification is left.
    ended: bool,
}

impl BlobBody {
    /// Streams `response` as blob `digest` of `size` bytes.
    pub fn stream(
        session: &Session,
        response: Response,
        digest: &str,
        size: u64,
        cancel: watch::Receiver<bool>,
    ) -> Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send + 'static>> {
        let body = BlobBody {
            response,
            read_timeout: session.read_timeout,
            what: session.what.clone(),
            host: session.endpoint.host.clone(),
            digest: digest.to_string(),
            size,
            seen: 0,
            hasher: Sha256::new(),
            cancel,
            ended: false,
        };
        Box::pin(futures::stream::unfold(Some(body), |state| async move {
            let mut body = state?;
            match body.next_chunk().await {
                Ok(Some(chunk)) => Some((Ok(chunk), Some(body))),
                Ok(None) => None,
                Err(msg) => Some((Err(std::io::Error::other(msg)), None)),
            }
        }))
    }

    /// The next chunk of about [`BLOB_CHUNK`] bytes; None at a verified end.
    async fn next_chunk(&mut self) -> std::result::Result<Option<Bytes>, String> {
        if self.ended {
            return self.verify().map(|()| None);
        }
        let mut gathered = bytes::BytesMut::new();
        loop {
            match self.read_some().await? {
                Some(chunk) if gathered.is_empty() && chunk.len() >= BLOB_CHUNK => {
                    return Ok(Some(chunk))
                }
                Some(chunk) => {
                    gathered.extend_from_slice(&chunk);
                    if gathered.len() >= BLOB_CHUNK {
                        return Ok(Some(gathered.freeze()));
                    }
                }
                None => {
                    self.ended = true;
                    if gathered.is_empty() {
                        return self.verify().map(|()| None);
                    }
                    return Ok(Some(gathered.freeze()));
                }
            }
        }
    }

    /// What the connection has next, counted and hashed; None at the body's end.
    async fn read_some(&mut self) -> std::result::Result<Option<Bytes>, String> {
        let (what, digest) = (&self.what, &self.digest);
        let next = tokio::select! {
            biased;
            _ = self.cancel.wait_for(|c| *c) => {
                return Err(format!("{what}: blob {digest}: the pull was called off"));
            }
            next = tokio::time::timeout(self.read_timeout, self.response.chunk()) => next,
        };
        let chunk = match next {
            Ok(Ok(Some(chunk))) => chunk,
            Ok(Ok(None)) => return Ok(None),
            Ok(Err(e)) if !e.is_timeout() => {
                return Err(format!(
                    "{what}: blob {digest} from {}: {}",
                    self.host,
                    error_chain(&e)
                ))
            }
            Ok(Err(_)) | Err(_) => {
                return Err(format!(
                    "{what}: blob {digest}: {} sent nothing for {:?} (--registry-read-timeout)",
                    self.host, self.read_timeout
                ))
            }
        };
        self.seen += chunk.len() as u64;
        if self.seen > self.size {
            return Err(format!(
                "{what}: blob {digest} is longer than the {} bytes its descriptor declares",
                self.size
            ));
        }
        self.hasher.update(&chunk);
        Ok(Some(chunk))
    }

    fn verify(&mut self) -> std::result::Result<(), String> {
        let (what, digest) = (&self.what, &self.digest);
        if self.seen != self.size {
            return Err(format!(
                "{what}: blob {digest} has {} bytes, its descriptor declares {}",
                self.seen, self.size
            ));
        }
        let got = format!("sha256:{}", hex::encode(self.hasher.clone().finalize()));
        if &got != digest {
            return Err(format!(
                "{what}: blob {digest} does not match its digest (the registry served {got})"
            ));
        }
        Ok(())
    }
}
