//! The slice of HPACK (RFC 7541) that [`super::authority`] needs: integers, string literals and
//! the Huffman code, to read one header's value and write it back plain.

use std::sync::OnceLock;

/// An HPACK integer with an N-bit prefix (RFC 7541 §5.1): its value and encoded length.
pub(super) fn decode_int(buf: &[u8], prefix_bits: u8) -> Option<(usize, usize)> {
    let max = (1usize << prefix_bits) - 1;
    let mut value = usize::from(*buf.first()?) & max;
    if value < max {
        return Some((value, 1));
    }
    let mut shift = 0;
    for (i, &b) in buf.iter().enumerate().skip(1) {
        // Four continuation bytes reach 2^28: more than any header block holds.
        if shift > 21 {
            return None;
        }
        value += usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// Appends `value` as an HPACK integer with an N-bit prefix after the bits in `first`.
pub(super) fn encode_int(mut value: usize, prefix_bits: u8, first: u8, out: &mut Vec<u8>) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// An HPACK string literal as sent.
pub(super) struct HpackString<'a> {
    pub(super) huffman: bool,
    pub(super) bytes: &'a [u8],
}

impl HpackString<'_> {
    pub(super) fn decode(&self) -> Option<Vec<u8>> {
        if self.huffman {
            huffman_decode(self.bytes)
        } else {
            Some(self.bytes.to_vec())
        }
    }
}

/// The string literal at the start of `buf` and its encoded length.
pub(super) fn string_at(buf: &[u8]) -> Option<(HpackString<'_>, usize)> {
    let huffman = *buf.first()? & 0x80 != 0;
    let (len, n) = decode_int(buf, 7)?;
    let bytes = buf.get(n..n.checked_add(len)?)?;
    Some((HpackString { huffman, bytes }, n + len))
}

/// The symbols of HPACK's Huffman code (RFC 7541 Appendix B) by code length. The code is
/// canonical: codes of one length are consecutive, in symbol order, so lengths define it.
pub(super) const HUFFMAN_SYMBOLS_BY_LENGTH: &[(u8, &[u16])] = &[
    (5, &[48, 49, 50, 97, 99, 101, 105, 111, 115, 116]),
    (
        6,
        &[
            32, 37, 45, 46, 47, 51, 52, 53, 54, 55, 56, 57, 61, 65, 95, 98, 100, 102, 103, 104,
            108, 109, 110, 112, 114, 117,
        ],
    ),
    (
        7,
        &[
            58, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 83, 84, 85, 86,
            87, 89, 106, 107, 113, 118, 119, 120, 121, 122,
        ],
    ),
    (8, &[38, 42, 44, 59, 88, 90]),
    (10, &[33, 34, 40, 41, 63]),
    (11, &[39, 43, 124]),
    (12, &[35, 62]),
    (13, &[0, 36, 64, 91, 93, 126]),
    (14, &[94, 125]),
    (15, &[60, 96, 123]),
    (19, &[92, 195, 208]),
    (20, &[128, 130, 131, 162, 184, 194, 224, 226]),
    (
        21,
        &[
            153, 161, 167, 172, 176, 177, 179, 209, 216, 217, 227, 229, 230,
        ],
    ),
    (
        22,
        &[
            129, 132, 133, 134, 136, 146, 154, 156, 160, 163, 164, 169, 170, 173, 178, 181, 185,
            186, 187, 189, 190, 196, 198, 228, 232, 233,
        ],
    ),
    (
        23,
        &[
            1, 135, 137, 138, 139, 140, 141, 143, 147, 149, 150, 151, 152, 155, 157, 158, 165, 166,
            168, 174, 175, 180, 182, 183, 188, 191, 197, 231, 239,
        ],
    ),
    (
        24,
        &[9, 142, 144, 145, 148, 159, 171, 206, 215, 225, 236, 237],
    ),
    (25, &[199, 207, 234, 235]),
    (
        26,
        &[
            192, 193, 200, 201, 202, 205, 210, 213, 218, 219, 238, 240, 242, 243, 255,
        ],
    ),
    (
        27,
        &[
            203, 204, 211, 212, 214, 221, 222, 223, 241, 244, 245, 246, 247, 248, 250, 251, 252,
            253, 254,
        ],
    ),
    (
        28,
        &[
            2, 3, 4, 5, 6, 7, 8, 11, 12, 14, 15, 16, 17, 18, 19, 20, 21, 23, 24, 25, 26, 27, 28,
            29, 30, 31, 127, 220, 249,
        ],
    ),
    (30, &[10, 13, 22, 256]),
];
/// The end-of-string symbol, which may only appear as padding.
pub(super) const HUFFMAN_EOS: u16 = 256;
/// The longest code.
pub(super) const HUFFMAN_MAX_LEN: usize = 30;

/// The canonical decoding table: per code length, its first code, how many codes it has and
/// where its symbols start in `symbols`.
pub(super) struct Huffman {
    pub(super) first_code: [u32; HUFFMAN_MAX_LEN + 1],
    pub(super) count: [u32; HUFFMAN_MAX_LEN + 1],
    pub(super) start: [usize; HUFFMAN_MAX_LEN + 1],
    pub(super) symbols: Vec<u16>,
}

pub(super) fn huffman() -> &'static Huffman {
    static TABLE: OnceLock<Huffman> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut h = Huffman {
            first_code: [0; HUFFMAN_MAX_LEN + 1],
            count: [0; HUFFMAN_MAX_LEN + 1],
            start: [0; HUFFMAN_MAX_LEN + 1],
            symbols: Vec::with_capacity(257),
        };
        let mut code = 0u32;
        for len in 1..=HUFFMAN_MAX_LEN {
            let symbols = HUFFMAN_SYMBOLS_BY_LENGTH
                .iter()
                .find(|(l, _)| usize::from(*l) == len)
                .map_or(&[][..], |(_, s)| *s);
            h.first_code[len] = code;
            h.count[len] = symbols.len() as u32;
            h.start[len] = h.symbols.len();
            h.symbols.extend_from_slice(symbols);
            code = (code + symbols.len() as u32) << 1;
        }
        h
    })
}

/// Decodes a Huffman-coded string; None if it is malformed (RFC 7541 §5.2: EOS inside, or
/// padding longer than 7 bits or not all ones).
pub(super) fn huffman_decode(bytes: &[u8]) -> Option<Vec<u8>> {
    let h = huffman();
    let mut out = Vec::with_capacity(bytes.len() * 8 / 5);
    let (mut code, mut len) = (0u32, 0usize);
    for &byte in bytes {
        for bit in (0..8).rev() {
            code = (code << 1) | u32::from((byte >> bit) & 1);
            len += 1;
            if len > HUFFMAN_MAX_LEN {
                return None;
            }
            let offset = code.wrapping_sub(h.first_code[len]);
            if code >= h.first_code[len] && offset < h.count[len] {
                let symbol = h.symbols[h.start[len] + offset as usize];
                if symbol == HUFFMAN_EOS {
                    return None;
                }
                out.push(symbol as u8);
                (code, len) = (0, 0);
            }
        }
    }
    (len <= 7 && code == (1 << len) - 1).then_some(out)
}
