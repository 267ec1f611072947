//! An HPACK (RFC 7541) header-block decoder for the bench's HTTP/2 client: the static
//! and dynamic tables, integer and string literals, and Huffman-coded strings.

use std::collections::VecDeque;

/// The static table (RFC 7541 appendix A), index 1 first.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// The dynamic table's size limit we allow (SETTINGS_HEADER_TABLE_SIZE, left at its default).
const MAX_TABLE: usize = 4096;

pub type Field = (Vec<u8>, Vec<u8>);

/// Decoding state of one connection (the dynamic table outlives each header block).
pub struct Decoder {
    table: VecDeque<Field>,
    size: usize,
    limit: usize,
}

struct Rd<'a> {
    b: &'a [u8],
}

impl<'a> Rd<'a> {
    fn byte(&mut self) -> Result<u8, String> {
        let (&x, rest) = self.b.split_first().ok_or("truncated header block")?;
        self.b = rest;
        Ok(x)
    }

    /// An integer with an `n`-bit prefix whose first byte is `first`.
    fn int(&mut self, first: u8, n: u32) -> Result<usize, String> {
        let max = (1usize << n) - 1;
        let mut v = usize::from(first) & max;
        if v < max {
            return Ok(v);
        }
        let mut shift = 0;
        loop {
            let b = self.byte()?;
            if shift > 28 {
                return Err("integer too large".into());
            }
            v += usize::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
    }

    fn string(&mut self) -> Result<Vec<u8>, String> {
        let first = self.byte()?;
        let n = self.int(first, 7)?;
        if n > self.b.len() {
            return Err("truncated string".into());
        }
        let (raw, rest) = self.b.split_at(n);
        self.b = rest;
        if first & 0x80 != 0 {
            huffman::decode(raw)
        } else {
            Ok(raw.to_vec())
        }
    }
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder { table: VecDeque::new(), size: 0, limit: MAX_TABLE }
    }

    fn get(&self, index: usize) -> Result<Field, String> {
        if index == 0 {
            return Err("index 0".into());
        }
        if let Some((n, v)) = STATIC.get(index - 1) {
            return Ok((n.as_bytes().to_vec(), v.as_bytes().to_vec()));
        }
        self.table.get(index - 1 - STATIC.len()).cloned().ok_or_else(|| format!("index {index} out of range"))
    }

    fn evict_to(&mut self, limit: usize) {
        while self.size > limit {
            let Some((n, v)) = self.table.pop_back() else { break };
            self.size -= n.len() + v.len() + 32;
        }
    }

    fn insert(&mut self, f: Field) {
        let size = f.0.len() + f.1.len() + 32;
        self.evict_to(self.limit.saturating_sub(size));
        if size <= self.limit {
            self.size += size;
            self.table.push_front(f);
        }
    }

    /// Decodes one complete header block.
    pub fn decode(&mut self, block: &[u8]) -> Result<Vec<Field>, String> {
        let mut r = Rd { b: block };
        let mut out = Vec::new();
        while !r.b.is_empty() {
            let first = r.byte()?;
            if first & 0x80 != 0 {
                out.push(self.get(r.int(first, 7)?)?);
            } else if first & 0xe0 == 0x20 {
                let limit = r.int(first, 5)?;
                if limit > MAX_TABLE {
                    return Err(format!("table size {limit} above the allowed {MAX_TABLE}"));
                }
                self.limit = limit;
                self.evict_to(limit);
            } else {
                let indexed = first & 0x40 != 0;
                let index = if indexed { r.int(first, 6)? } else { r.int(first, 4)? };
                let name = if index == 0 { r.string()? } else { self.get(index)?.0 };
                let value = r.string()?;
                if indexed {
                    self.insert((name.clone(), value.clone()));
                }
                out.push((name, value));
            }
        }
        Ok(out)
    }
}

/// Huffman-coded string literals (RFC 7541 appendix B). The code is canonical: codes of
/// one length are consecutive numbers in symbol order, and each length's first code
/// follows from the counts of the shorter ones, so the lengths alone define it.
mod huffman {
    use std::sync::OnceLock;

    /// Code length in bits of each symbol 0..=255, then of EOS (256).
    #[rustfmt::skip]
    const LENGTHS: [u8; 257] = [
        13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28,
        6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10,
        13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6,
        15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, 6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28,
        20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, 24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24,
        22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, 21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23,
        26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, 19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27,
        20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, 26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26,
        30,
    ];
    const MAX_LEN: usize = 30;
    const EOS: u16 = 256;

    /// For each length: the first code of that length, how many codes have it, and where
    /// its symbols start in `symbols` (which lists the symbols by length, then value).
    struct Table {
        first: [u32; MAX_LEN + 1],
        count: [u32; MAX_LEN + 1],
        offset: [u32; MAX_LEN + 1],
        symbols: Vec<u16>,
    }

    fn table() -> &'static Table {
        static TABLE: OnceLock<Table> = OnceLock::new();
        TABLE.get_or_init(|| {
            let mut t = Table {
                first: [0; MAX_LEN + 1],
                count: [0; MAX_LEN + 1],
                offset: [0; MAX_LEN + 1],
                symbols: Vec::new(),
            };
            for &len in &LENGTHS {
                t.count[len as usize] += 1;
            }
            let mut code = 0u32;
            for len in 1..=MAX_LEN {
                code = (code + t.count[len - 1]) << 1;
                t.first[len] = code;
                t.offset[len] = t.offset[len - 1] + t.count[len - 1];
            }
            for len in 1..=MAX_LEN {
                t.symbols.extend((0..=EOS).filter(|&s| LENGTHS[s as usize] as usize == len));
            }
            t
        })
    }

    /// Decodes `raw`; its padding must be fewer than 8 one-bits (a prefix of EOS).
    pub fn decode(raw: &[u8]) -> Result<Vec<u8>, String> {
        let t = table();
        let mut out = Vec::with_capacity(raw.len() * 8 / 5);
        let (mut code, mut len) = (0u32, 0usize);
        for &byte in raw {
            for bit in (0..8).rev() {
                code = (code << 1) | u32::from(byte >> bit & 1);
                len += 1;
                let k = code.wrapping_sub(t.first[len]);
                if code >= t.first[len] && k < t.count[len] {
                    let sym = t.symbols[(t.offset[len] + k) as usize];
                    if sym == EOS {
                        return Err("EOS in a Huffman string".into());
                    }
                    out.push(sym as u8);
                    (code, len) = (0, 0);
                } else if len == MAX_LEN {
                    return Err("invalid Huffman code".into());
                }
            }
        }
        if len >= 8 || code != (1 << len) - 1 {
            return Err("bad Huffman padding".into());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
    }

    fn fields(list: &[(&str, &str)]) -> Vec<Field> {
        list.iter().map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec())).collect()
    }

    #[test]
    fn huffman_strings_of_rfc_7541_decode() {
        for (coded, plain) in [
            ("f1e3 c2e5 f23a 6ba0 ab90 f4ff", "www.example.com"),
            ("a8eb 1064 9cbf", "no-cache"),
            ("25a8 49e9 5ba9 7d7f", "custom-key"),
            ("25a8 49e9 5bb8 e8b4 bf", "custom-value"),
            ("6402", "302"),
            ("aec3 771a 4b", "private"),
            ("d07a be94 1054 d444 a820 0595 040b 8166 e082 a62d 1bff", "Mon, 21 Oct 2013 20:13:21 GMT"),
            ("9d29 ad17 1863 c78f 0b97 c8e9 ae82 ae43 d3", "https://www.example.com"),
        ] {
            assert_eq!(huffman::decode(&hex(coded)).as_deref(), Ok(plain.as_bytes()), "{plain}");
        }
        // Padding must be short and all ones.
        assert_eq!(huffman::decode(&hex("63")).as_deref(), Ok(&b"/"[..]), "two bits of padding");
        assert!(huffman::decode(&hex("60")).is_err(), "zero padding");
        assert!(huffman::decode(&hex("64 02ff")).is_err(), "a whole byte of padding");
    }

    #[test]
    fn request_examples_of_rfc_7541_share_one_dynamic_table() {
        // RFC 7541 C.4: three requests with Huffman coding, on one connection.
        let mut d = Decoder::new();
        let first = d.decode(&hex("8286 8441 8cf1 e3c2 e5f2 3a6b a0ab 90f4 ff")).expect("first request");
        assert_eq!(
            first,
            fields(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com")
            ])
        );
        assert_eq!(d.size, 57);
        let second = d.decode(&hex("8286 84be 5886 a8eb 1064 9cbf")).expect("second request");
        assert_eq!(
            second,
            fields(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache"),
            ])
        );
        let third = d
            .decode(&hex("8287 85bf 4088 25a8 49e9 5ba9 7d7f 8925 a849 e95b b8e8 b4bf"))
            .expect("third request");
        assert_eq!(
            third,
            fields(&[
                (":method", "GET"),
                (":scheme", "https"),
                (":path", "/index.html"),
                (":authority", "www.example.com"),
                ("custom-key", "custom-value"),
            ])
        );
        assert_eq!(d.size, 164);
    }

    #[test]
    fn responses_evict_the_oldest_entries_of_a_small_table() {
        // RFC 7541 C.5: responses without Huffman coding, table limited to 256 bytes.
        let mut d = Decoder::new();
        d.decode(&hex("3fe1 01")).expect("a size update to 256");
        let first = d
            .decode(&hex("4803 3330 3258 0770 7269 7661 7465 611d 4d6f 6e2c 2032 3120 4f63 7420 3230 3133 \
                 2032 303a 3133 3a32 3120 474d 546e 1768 7474 7073 3a2f 2f77 7777 2e65 7861 6d70 \
                 6c65 2e63 6f6d"))
            .expect("first response");
        assert_eq!(first[0], fields(&[(":status", "302")])[0]);
        assert_eq!(d.size, 222);
        let second = d.decode(&hex("4803 3330 37c1 c0bf")).expect("second response");
        assert_eq!(second[0], fields(&[(":status", "307")])[0]);
        assert_eq!(second[3], fields(&[("location", "https://www.example.com")])[0]);
        assert_eq!(d.size, 222, "\":status: 302\" was evicted for \":status: 307\"");
        assert!(d.decode(&hex("be")).is_ok() && d.decode(&hex("c2")).is_err(), "only four entries remain");
    }

    #[test]
    fn broken_blocks_are_errors_not_panics() {
        for bad in ["ff", "3fe2 1f", "40", "4085 6162", "00 8a ff", "80", "ffff ffff ff0f"] {
            assert!(Decoder::new().decode(&hex(bad)).is_err(), "{bad}");
        }
    }
}
