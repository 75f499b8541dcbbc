//! A valid HTTP/2 `:authority` for clients on our unix socket.
//!
//! grpcurl `-unix`, Python grpcio (`unix:/path`, percent-encoded since 1.57) and grpc-java send
//! the socket's path as `:authority`. It is not a URI authority, and h2 (under tonic) answers
//! every such request with RST_STREAM(PROTOCOL_ERROR) before any service sees it; h2 has no
//! option to relax that (hyperium/h2#487 is still open). We serve no virtual hosts, so the value
//! only has to parse: [`NormalizeAuthority`] wraps an accepted unix connection and rewrites an
//! invalid `:authority` in the client's bytes before h2 reads them.
//!
//! HPACK makes this delicate: a header the client adds to its dynamic table is referred to
//! later by index, and table eviction depends on each entry's length. So the rewrite keeps the
//! value's length and its representation (only the string's encoding may change, from Huffman
//! to plain): every byte outside `[A-Za-z0-9-._~]` becomes `_` (`/run/s.sock` →
//! `_run_s.sock`), and both tables keep evicting alike. Only header blocks are decoded; every
//! other frame is passed on as read. A valid authority (`localhost`, `host:port`) is left alone,
//! as is a block whose `:authority` name is a dynamic-table reference (no client we know sends
//! one) or one larger than [`MAX_HEADER_BLOCK`].

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

use super::hpack::{decode_int, encode_int, string_at};

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Length of a frame header.
const FRAME_HEADER_LEN: usize = 9;
/// Largest frame payload we send on: the smallest SETTINGS_MAX_FRAME_SIZE a server may have.
const MAX_FRAME_PAYLOAD: usize = 16_384;
/// Largest header block (all its frames) held back for rewriting; a larger one is passed on as
/// is (h2's own header-list limit then applies).
pub const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// How much is read from the socket at a time.
const READ_CHUNK: usize = 16 * 1024;

const TYPE_HEADERS: u8 = 0x1;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// HPACK static table index of `:authority`.
const STATIC_AUTHORITY: usize = 1;

/// An accepted connection whose client's `:authority` values are made valid before h2 sees them.
#[derive(Debug)]
pub struct NormalizeAuthority<S> {
    inner: S,
    /// Read from the socket, not yet looked at.
    input: Vec<u8>,
    /// Ready for h2.
    output: Vec<u8>,
    /// How much of `output` h2 has taken.
    output_taken: usize,
    phase: Phase,
    /// Payload bytes of the current non-header frame still to pass on as read.
    passing: usize,
    /// The header block being gathered (HEADERS up to END_HEADERS).
    block: Option<Block>,
    /// A too-large block is being passed on: its CONTINUATION frames go as read.
    passing_block: bool,
    /// Whether a rewrite was logged on this connection.
    logged: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Matching the client preface; `usize` bytes matched so far.
    Preface(usize),
    /// Reading frames.
    Frames,
    /// Not HTTP/2 (or the socket ended): everything is passed on as read.
    Opaque,
}

/// A header block being gathered.
#[derive(Debug, Default)]
struct Block {
    /// Every byte of its frames, as read, to pass on should it not need (or allow) a rewrite.
    raw: Vec<u8>,
    /// The HEADERS frame's flags and stream id.
    flags: u8,
    stream_id: [u8; 4],
    /// Its priority fields, if it has them.
    priority: Option<[u8; 5]>,
    /// The header block fragment of every frame, concatenated.
    fragment: Vec<u8>,
}

impl<S> NormalizeAuthority<S> {
    /// Wraps an accepted connection.
    pub fn new(inner: S) -> Self {
        NormalizeAuthority {
            inner,
            input: Vec::new(),
            output: Vec::new(),
            output_taken: 0,
            phase: Phase::Preface(0),
            passing: 0,
            block: None,
            passing_block: false,
            logged: false,
        }
    }

    /// Moves what can be decided from `input` to `output`.
    fn process(&mut self) {
        let mut at = 0;
        loop {
            let input = &self.input[at..];
            if input.is_empty() {
                break;
            }
            match self.phase {
                Phase::Opaque => {
                    self.output.extend_from_slice(input);
                    at += input.len();
                }
                Phase::Preface(matched) => {
                    let want = &PREFACE[matched..];
                    let n = want.len().min(input.len());
                    if input[..n] == want[..n] {
                        self.output.extend_from_slice(&input[..n]);
                        at += n;
                        self.phase = if matched + n == PREFACE.len() {
                            Phase::Frames
                        } else {
                            Phase::Preface(matched + n)
                        };
                    } else {
                        self.phase = Phase::Opaque;
                    }
                }
                Phase::Frames if self.passing > 0 => {
                    let n = self.passing.min(input.len());
                    self.output.extend_from_slice(&input[..n]);
                    self.passing -= n;
                    at += n;
                }
                Phase::Frames => {
                    if input.len() < FRAME_HEADER_LEN {
                        break;
                    }
                    let len = u32::from_be_bytes([0, input[0], input[1], input[2]]) as usize;
                    let (kind, flags) = (input[3], input[4]);
                    let available = input.len();
                    if kind == TYPE_CONTINUATION && self.passing_block {
                        self.passing_block = flags & FLAG_END_HEADERS == 0;
                        self.pass_frame(len, &mut at);
                        continue;
                    }
                    if kind != TYPE_CONTINUATION || self.block.is_none() {
                        // A block interrupted by any other frame (HEADERS included) is a
                        // protocol error: h2 says so, from the bytes as they were sent.
                        self.flush_block();
                        self.passing_block = false;
                    }
                    let header_frame = kind == TYPE_HEADERS || self.block.is_some();
                    let held = self.block.as_ref().map_or(0, |b| b.raw.len());
                    if !header_frame || held + FRAME_HEADER_LEN + len > MAX_HEADER_BLOCK {
                        self.flush_block();
                        self.passing_block = header_frame && flags & FLAG_END_HEADERS == 0;
                        self.pass_frame(len, &mut at);
                        continue;
                    }
                    if available < FRAME_HEADER_LEN + len {
                        break;
                    }
                    let frame = &self.input[at..at + FRAME_HEADER_LEN + len];
                    at += frame.len();
                    match gather(&mut self.block, frame) {
                        Gathered::More => {}
                        Gathered::Done => {
                            if let Some(block) = self.block.take() {
                                self.finish_block(block);
                            }
                        }
                        Gathered::Malformed => self.flush_block(),
                    }
                }
            }
        }
        self.input.drain(..at);
    }

    /// Passes on a frame header and arranges for its `len` payload bytes to follow as read.
    fn pass_frame(&mut self, len: usize, at: &mut usize) {
        self.output
            .extend_from_slice(&self.input[*at..*at + FRAME_HEADER_LEN]);
        *at += FRAME_HEADER_LEN;
        self.passing = len;
    }

    /// Passes on a gathered block's frames as they were read.
    fn flush_block(&mut self) {
        if let Some(block) = self.block.take() {
            self.output.extend_from_slice(&block.raw);
        }
    }

    fn finish_block(&mut self, block: Block) {
        let Some((rewritten, fixed)) = rewrite_block(&block.fragment) else {
            self.output.extend_from_slice(&block.raw);
            return;
        };
        if !self.logged {
            self.logged = true;
            tracing::debug!(
                authority = %String::from_utf8_lossy(&fixed),
                "a unix-socket client sent an invalid :authority; passing it on normalised"
            );
        }
        frame_block(&block, &rewritten, &mut self.output);
    }

    /// Flushes whatever is held back: the socket has ended.
    fn finish_input(&mut self) {
        self.flush_block();
        self.output.append(&mut self.input);
        self.phase = Phase::Opaque;
    }
}

/// What adding a frame to a block left it as.
enum Gathered {
    More,
    Done,
    /// Its padding or priority fields do not fit: pass it on and let h2 reject it.
    Malformed,
}

/// Adds a HEADERS or CONTINUATION frame to the block being gathered (a HEADERS frame starts it).
fn gather(block: &mut Option<Block>, frame: &[u8]) -> Gathered {
    let (kind, flags) = (frame[3], frame[4]);
    let payload = &frame[FRAME_HEADER_LEN..];
    let b = block.get_or_insert_with(Block::default);
    b.raw.extend_from_slice(frame);
    if kind == TYPE_HEADERS {
        b.flags = flags;
        b.stream_id.copy_from_slice(&frame[5..9]);
        let mut body = payload;
        let mut pad = 0;
        if flags & FLAG_PADDED != 0 {
            let Some((&p, rest)) = body.split_first() else {
                return Gathered::Malformed;
            };
            pad = usize::from(p);
            body = rest;
        }
        if flags & FLAG_PRIORITY != 0 {
            let Some(fields) = body.get(..5) else {
                return Gathered::Malformed;
            };
            b.priority = Some(fields.try_into().expect("5 bytes"));
            body = &body[5..];
        }
        let Some(fragment) = body.len().checked_sub(pad).map(|n| &body[..n]) else {
            return Gathered::Malformed;
        };
        b.fragment.extend_from_slice(fragment);
    } else {
        b.fragment.extend_from_slice(payload);
    }
    if flags & FLAG_END_HEADERS != 0 {
        Gathered::Done
    } else {
        Gathered::More
    }
}

/// Writes a rewritten block as HEADERS (its flags less PADDED, its priority kept) and as many
/// CONTINUATION frames as [`MAX_FRAME_PAYLOAD`] needs.
fn frame_block(block: &Block, fragment: &[u8], out: &mut Vec<u8>) {
    let priority: &[u8] = block.priority.as_ref().map_or(&[], |p| &p[..]);
    let first = fragment.len().min(MAX_FRAME_PAYLOAD - priority.len());
    let mut chunks = vec![&fragment[..first]];
    chunks.extend(fragment[first..].chunks(MAX_FRAME_PAYLOAD));
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let (kind, mut flags, prefix) = if i == 0 {
            (
                TYPE_HEADERS,
                block.flags & !(FLAG_PADDED | FLAG_END_HEADERS),
                priority,
            )
        } else {
            (TYPE_CONTINUATION, 0, &[][..])
        };
        if i == last {
            flags |= FLAG_END_HEADERS;
        }
        let len = (prefix.len() + chunk.len()) as u32;
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&block.stream_id);
        out.extend_from_slice(prefix);
        out.extend_from_slice(chunk);
    }
}

/// The header block with every invalid `:authority` value replaced (see the module docs), and
/// the last replacement; None if nothing needed it or the block does not parse.
fn rewrite_block(block: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut out = Vec::with_capacity(block.len() + 32);
    let mut fixed = None;
    let mut at = 0;
    while at < block.len() {
        let rest = &block[at..];
        let first = rest[0];
        let (prefix_bits, literal) = if first & 0x80 != 0 {
            (7, false) // indexed field
        } else if first & 0xc0 == 0x40 {
            (6, true) // literal with incremental indexing
        } else if first & 0xe0 == 0x20 {
            (5, false) // dynamic table size update
        } else {
            (4, true) // literal without indexing, or never indexed
        };
        let (index, mut len) = decode_int(rest, prefix_bits)?;
        if !literal {
            out.extend_from_slice(&rest[..len]);
            at += len;
            continue;
        }
        let is_authority = if index == 0 {
            let (name, n) = string_at(&rest[len..])?;
            len += n;
            name.decode()? == b":authority"
        } else {
            index == STATIC_AUTHORITY
        };
        let (value, n) = string_at(&rest[len..])?;
        let replacement = if is_authority {
            let value = value.decode()?;
            (http::uri::Authority::try_from(value.as_slice()).is_err() && !value.is_empty())
                .then(|| normalize(&value))
        } else {
            None
        };
        match replacement {
            Some(new) => {
                out.extend_from_slice(&rest[..len]);
                encode_int(new.len(), 7, 0x00, &mut out);
                out.extend_from_slice(&new);
                fixed = Some(new);
            }
            None => out.extend_from_slice(&rest[..len + n]),
        }
        at += len + n;
    }
    fixed.map(|f| (out, f))
}

/// The same number of bytes, each outside `[A-Za-z0-9-._~]` replaced by `_`: a valid authority.
fn normalize(value: &[u8]) -> Vec<u8> {
    value
        .iter()
        .map(|&b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => b,
            _ => b'_',
        })
        .collect()
}

impl<S: AsyncRead + Unpin> AsyncRead for NormalizeAuthority<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.output_taken < this.output.len() {
                let ready = &this.output[this.output_taken..];
                let n = ready.len().min(buf.remaining());
                buf.put_slice(&ready[..n]);
                this.output_taken += n;
                if this.output_taken == this.output.len() {
                    this.output.clear();
                    this.output_taken = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut read = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if read.filled().is_empty() => {
                    this.finish_input();
                    if this.output.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Ok(())) => {
                    this.input.extend_from_slice(read.filled());
                    this.process();
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for NormalizeAuthority<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for NormalizeAuthority<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::super::hpack::*;
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Test-only encoder: the canonical code of each symbol.
    fn huffman_encode(s: &[u8]) -> Vec<u8> {
        let h = huffman();
        let (mut acc, mut bits, mut out) = (0u64, 0u32, Vec::new());
        for &b in s {
            let i = h.symbols.iter().position(|&x| x == u16::from(b)).unwrap();
            let len = (1..=HUFFMAN_MAX_LEN)
                .find(|&l| i >= h.start[l] && i < h.start[l] + h.count[l] as usize)
                .unwrap();
            let code = h.first_code[len] + (i - h.start[len]) as u32;
            acc = (acc << len) | u64::from(code);
            bits += len as u32;
            while bits >= 8 {
                out.push((acc >> (bits - 8)) as u8);
                bits -= 8;
            }
        }
        if bits > 0 {
            out.push(((acc << (8 - bits)) as u8) | (0xff >> bits));
        }
        out
    }

    fn literal(first: u8, prefix_bits: u8, index: usize, value: &[u8], huffman: bool) -> Vec<u8> {
        let mut out = Vec::new();
        encode_int(index, prefix_bits, first, &mut out);
        let bytes = if huffman {
            huffman_encode(value)
        } else {
            value.to_vec()
        };
        encode_int(bytes.len(), 7, if huffman { 0x80 } else { 0 }, &mut out);
        out.extend_from_slice(&bytes);
        out
    }

    /// `:method POST`, `:scheme http`, `:path`, `:authority` (literal with incremental indexing)
    /// and `content-type` as a literal with a literal name.
    fn request_block(authority: &[u8], huffman: bool) -> Vec<u8> {
        let mut b = vec![0x83, 0x86];
        b.extend(literal(
            0x40,
            6,
            4,
            b"/grpc.health.v1.Health/Check",
            huffman,
        ));
        b.extend(literal(0x40, 6, STATIC_AUTHORITY, authority, huffman));
        b.push(0x00);
        encode_int(12, 7, 0, &mut b);
        b.extend_from_slice(b"content-type");
        encode_int(16, 7, 0, &mut b);
        b.extend_from_slice(b"application/grpc");
        b
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// The decoded (name index or name, value) pairs of a block's literals.
    fn literals(block: &[u8]) -> Vec<(usize, Vec<u8>)> {
        let mut fields = Vec::new();
        let mut at = 0;
        while at < block.len() {
            let first = block[at];
            if first & 0x80 != 0 {
                at += decode_int(&block[at..], 7).unwrap().1;
                continue;
            }
            let bits = if first & 0xc0 == 0x40 { 6 } else { 4 };
            let (index, mut n) = decode_int(&block[at..], bits).unwrap();
            if index == 0 {
                n += string_at(&block[at + n..]).unwrap().1;
            }
            let (value, m) = string_at(&block[at + n..]).unwrap();
            fields.push((index, value.decode().unwrap()));
            at += n + m;
        }
        fields
    }

    #[test]
    fn huffman_code_is_complete_and_decodes_the_rfc_examples() {
        // Kraft: a complete prefix code's lengths sum to exactly 1.
        let kraft: u64 = HUFFMAN_SYMBOLS_BY_LENGTH
            .iter()
            .map(|(len, s)| s.len() as u64 * (1u64 << (30 - len)))
            .sum();
        assert_eq!(kraft, 1 << 30);
        let count: usize = HUFFMAN_SYMBOLS_BY_LENGTH.iter().map(|(_, s)| s.len()).sum();
        assert_eq!(count, 257);
        // RFC 7541 C.4.1-C.4.3 and C.6.1.
        for (hex_code, text) in [
            ("f1e3c2e5f23a6ba0ab90f4ff", "www.example.com"),
            ("a8eb10649cbf", "no-cache"),
            ("25a849e95ba97d7f", "custom-key"),
            ("25a849e95bb8e8b4bf", "custom-value"),
            ("6402", "302"),
            ("aec3771a4b", "private"),
            (
                "d07abe941054d444a8200595040b8166e082a62d1bff",
                "Mon, 21 Oct 2013 20:13:21 GMT",
            ),
            (
                "9d29ad171863c78f0b97c8e9ae82ae43d3",
                "https://www.example.com",
            ),
        ] {
            let bytes = hex::decode(hex_code).unwrap();
            assert_eq!(huffman_decode(&bytes).unwrap(), text.as_bytes(), "{text}");
            assert_eq!(huffman_encode(text.as_bytes()), bytes, "{text}");
        }
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(huffman_decode(&huffman_encode(&all)).unwrap(), all);
        // EOS inside a string, and padding of zeros, are malformed.
        assert_eq!(huffman_decode(&[0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(huffman_decode(&[0x00]), None);
    }

    #[test]
    fn hpack_integers_round_trip_the_rfc_examples() {
        // RFC 7541 C.1.
        let mut out = Vec::new();
        encode_int(10, 5, 0, &mut out);
        encode_int(1337, 5, 0, &mut out);
        assert_eq!(out, [0x0a, 0x1f, 0x9a, 0x0a]);
        assert_eq!(decode_int(&[0x1f, 0x9a, 0x0a], 5), Some((1337, 3)));
        assert_eq!(decode_int(&[42], 8), Some((42, 1)));
        assert_eq!(decode_int(&[0x1f, 0x9a], 5), None);
    }

    #[test]
    fn an_invalid_authority_becomes_valid_with_its_length_kept() {
        for huffman in [false, true] {
            for (sent, want) in [
                (&b"/run/sandboxd/s.sock"[..], &b"_run_sandboxd_s.sock"[..]),
                (b"%2Frun%2Fs.sock", b"_2Frun_2Fs.sock"),
            ] {
                let (block, fixed) = rewrite_block(&request_block(sent, huffman)).unwrap();
                assert_eq!(fixed, want);
                assert!(http::uri::Authority::try_from(fixed.as_slice()).is_ok());
                let fields = literals(&block);
                assert_eq!(fields[1], (STATIC_AUTHORITY, want.to_vec()));
                // Everything else is untouched.
                let original = literals(&request_block(sent, huffman));
                assert_eq!(fields[0], original[0]);
                assert_eq!(fields[2], original[2]);
            }
        }
        // A literal name spelled out is recognised too.
        let mut block = vec![0x10];
        encode_int(10, 7, 0, &mut block);
        block.extend_from_slice(b":authority");
        encode_int(3, 7, 0, &mut block);
        block.extend_from_slice(b"/x/");
        let (block, _) = rewrite_block(&block).unwrap();
        assert_eq!(literals(&block), [(0, b"_x_".to_vec())]);
    }

    #[test]
    fn valid_authorities_and_other_headers_are_left_alone() {
        for authority in [&b"localhost"[..], b"127.0.0.1:50051", b"[::1]:80", b""] {
            assert!(rewrite_block(&request_block(authority, true)).is_none());
        }
        // A path that is not :authority is not ours to change.
        let mut block = vec![0x83];
        block.extend(literal(0x40, 6, 4, b"/a b", false));
        assert!(rewrite_block(&block).is_none());
        // Garbage is passed on for h2 to judge.
        assert!(rewrite_block(&[0x41, 0x85, b'x']).is_none());
    }

    /// Reads everything `input` produces through the wrapper, `chunk` bytes at a time.
    async fn through(input: Vec<u8>, chunk: usize) -> Vec<u8> {
        let (mut tx, rx) = tokio::io::duplex(chunk);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for piece in input.chunks(chunk) {
                tx.write_all(piece).await.unwrap();
            }
        });
        let mut out = Vec::new();
        NormalizeAuthority::new(rx)
            .read_to_end(&mut out)
            .await
            .unwrap();
        writer.await.unwrap();
        out
    }

    #[tokio::test]
    async fn the_connection_passes_frames_on_and_reframes_a_fixed_block() {
        let settings = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
        let data = frame(0x0, 0x1, 1, b"\0\0\0\0\x05hello");
        let block = request_block(b"/tmp/x.sock", true);
        // HEADERS with padding and priority, split over a CONTINUATION.
        let (a, b) = block.split_at(10);
        let mut headers_payload = vec![3];
        headers_payload.extend_from_slice(&[0, 0, 0, 0, 15]);
        headers_payload.extend_from_slice(a);
        headers_payload.extend_from_slice(&[0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(&settings);
        input.extend(frame(
            TYPE_HEADERS,
            FLAG_PADDED | FLAG_PRIORITY,
            1,
            &headers_payload,
        ));
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, b));
        input.extend(&data);
        // A valid block on stream 3 goes through byte for byte.
        let valid = frame(
            TYPE_HEADERS,
            FLAG_END_HEADERS,
            3,
            &request_block(b"localhost", true),
        );
        input.extend(&valid);

        let (fixed, _) = rewrite_block(&block).unwrap();
        let mut want = PREFACE.to_vec();
        want.extend(&settings);
        let mut payload = vec![0, 0, 0, 0, 15];
        payload.extend(&fixed);
        want.extend(frame(
            TYPE_HEADERS,
            FLAG_PRIORITY | FLAG_END_HEADERS,
            1,
            &payload,
        ));
        want.extend(&data);
        want.extend(&valid);
        for chunk in [1, 7, 4096] {
            assert_eq!(through(input.clone(), chunk).await, want, "chunk {chunk}");
        }
    }

    #[tokio::test]
    async fn a_block_that_outgrows_a_frame_continues_in_another() {
        // A Huffman-coded authority grows when sent plain; near the frame limit that spills.
        let authority = "/".repeat(3000);
        let mut block = request_block(authority.as_bytes(), true);
        let filler = MAX_FRAME_PAYLOAD - block.len() - 8;
        block.push(0x00);
        encode_int(1, 7, 0, &mut block);
        block.push(b'x');
        encode_int(filler, 7, 0, &mut block);
        block.extend(std::iter::repeat_n(b'y', filler));
        assert!(block.len() <= MAX_FRAME_PAYLOAD);
        let mut input = PREFACE.to_vec();
        input.extend(frame(TYPE_HEADERS, FLAG_END_HEADERS | 0x1, 1, &block));
        let out = through(input, 4096).await;
        let first_len = u32::from_be_bytes([0, out[24], out[25], out[26]]) as usize;
        assert_eq!(first_len, MAX_FRAME_PAYLOAD);
        assert_eq!(
            (out[27], out[28]),
            (TYPE_HEADERS, 0x1),
            "END_STREAM kept, END_HEADERS moved"
        );
        let second = &out[24 + 9 + first_len..];
        assert_eq!(
            (second[3], second[4]),
            (TYPE_CONTINUATION, FLAG_END_HEADERS)
        );
        let mut fragment = out[24 + 9..24 + 9 + first_len].to_vec();
        fragment.extend_from_slice(&second[9..]);
        assert_eq!(literals(&fragment)[1].1, "_".repeat(3000).into_bytes());
    }

    #[tokio::test]
    async fn a_connection_that_is_not_http2_passes_through() {
        let input = b"GET / HTTP/1.1\r\nHost: /x\r\n\r\n".to_vec();
        assert_eq!(through(input.clone(), 5).await, input);
    }
}
