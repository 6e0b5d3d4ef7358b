//! One NATS subject token for one middleman target, and back.
//!
//! A middleman TARGET (PROTOCOL.md §2) is 1 to 255 bytes with no control character, but it
//! may hold spaces, `.`, `*`, `>` and any byte from 0x80 up. A NATS subject is split into
//! tokens at `.`, cannot hold whitespace, and a token that is exactly `*` or `>` is a
//! wildcard. So a target cannot be used as a subject (or a token of one) as it is.
//!
//! The encoding keeps `A-Z`, `a-z`, `0-9`, `_` and `-` as they are (plain names stay
//! readable: `orders-eu_1` is `orders-eu_1`) and writes every other byte as `~` and two
//! upper-case hexadecimal digits (`MSG:ab` is `MSG~3Aab`, `a.b` is `a~2Eb`, `~` is `~7E`).
//! The token therefore holds only `[A-Za-z0-9_~-]`: never `.`, whitespace, a wildcard, a
//! control character, or the `$` that starts NATS's reserved subjects.
//!
//! The encoding is canonical: [`decode`] accepts exactly the tokens [`encode`] writes, so
//! every target has one token and every token one target (an escape of a byte that is kept
//! as is, lower-case hex digits, a `~` without two hex digits after it, any other byte, and
//! the empty token are refused). Two nodes can therefore never spell one target two ways
//! and miss each other's subscriptions.
//!
//! Any non-empty byte string can be encoded, not only valid targets; the token is at most
//! three times as long as the input ([`MAX_TOKEN`] for a target).

use crate::protocol::decode::MAX_TARGET;

/// The longest token of a target (every byte escaped).
pub const MAX_TOKEN: usize = 3 * MAX_TARGET;

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Bytes written as they are.
static KEEP: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric() || c == b'_' || c == b'-';
        b += 1;
    }
    t
};

/// Whether `b` is written as it is (not escaped).
pub fn is_kept(b: u8) -> bool {
    KEEP[usize::from(b)]
}

/// Length of the token [`encode`] writes for `target`.
pub fn encoded_len(target: &[u8]) -> usize {
    target.iter().map(|&b| if is_kept(b) { 1 } else { 3 }).sum()
}

/// Append the token of `target` to `out`. `target` should be non-empty (every middleman
/// target is): the empty string gives the empty token, which is no subject token and
/// which [`decode`] refuses.
pub fn encode(target: &[u8], out: &mut Vec<u8>) {
    out.reserve(encoded_len(target));
    for &b in target {
        if is_kept(b) {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'~', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        }
    }
}

/// [`decode`], without a copy when nothing in `token` is escaped (most targets are their
/// own token).
pub fn decode_cow(token: &[u8]) -> Option<std::borrow::Cow<'_, [u8]>> {
    if !token.is_empty() && token.iter().all(|&b| is_kept(b)) {
        return Some(std::borrow::Cow::Borrowed(token));
    }
    decode(token).map(std::borrow::Cow::Owned)
}

/// The target a token stands for, or `None` when `token` is not exactly what [`encode`]
/// writes for some non-empty input.
pub fn decode(token: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(token.len());
    decode_into(token, &mut out).then_some(out)
}

/// Like [`decode`], appending to `out`; returns false (and leaves `out` as it was) when
/// `token` is not a valid token.
pub fn decode_into(token: &[u8], out: &mut Vec<u8>) -> bool {
    let start = out.len();
    if token.is_empty() {
        return false;
    }
    let mut i = 0;
    while i < token.len() {
        let b = token[i];
        if is_kept(b) {
            out.push(b);
            i += 1;
            continue;
        }
        let escaped = match (b, token.get(i + 1), token.get(i + 2)) {
            (b'~', Some(&hi), Some(&lo)) => hex(hi).zip(hex(lo)).map(|(h, l)| h << 4 | l),
            _ => None,
        };
        match escaped {
            // An escaped byte that is kept as is would be a second spelling.
            Some(v) if !is_kept(v) => {
                out.push(v);
                i += 3;
            }
            _ => {
                out.truncate(start);
                return false;
            }
        }
    }
    true
}

/// Whether `token` is a valid token (what [`decode`] accepts), without decoding it.
pub fn is_valid(token: &[u8]) -> bool {
    let mut scratch = Vec::new();
    decode_into(token, &mut scratch)
}

/// Value of an upper-case hexadecimal digit.
fn hex(d: u8) -> Option<u8> {
    match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'A'..=b'F' => Some(d - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(t: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(t, &mut out);
        out
    }

    /// What a NATS subject token may not hold, and what our tokens never hold.
    fn assert_safe(token: &[u8]) {
        assert!(!token.is_empty());
        for &b in token {
            assert!(
                b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'~',
                "byte {b:#04x} in token {:?}",
                String::from_utf8_lossy(token)
            );
        }
        assert!(token != b"*" && token != b">");
    }

    #[test]
    fn plain_names_stay_readable() {
        assert_eq!(enc(b"orders-eu_1"), b"orders-eu_1");
        assert_eq!(enc(b"ABCxyz0189"), b"ABCxyz0189");
    }

    #[test]
    fn everything_else_is_escaped_in_upper_case_hex() {
        assert_eq!(enc(b"MSG:ab"), b"MSG~3Aab");
        assert_eq!(enc(b"a.b"), b"a~2Eb");
        assert_eq!(enc(b"a b"), b"a~20b");
        assert_eq!(enc(b"*"), b"~2A");
        assert_eq!(enc(b">"), b"~3E");
        assert_eq!(enc(b"~"), b"~7E");
        assert_eq!(enc(b"$SYS"), b"~24SYS");
        assert_eq!(enc("é".as_bytes()), b"~C3~A9");
        assert_eq!(enc(b"\x00\xff"), b"~00~FF");
        assert_eq!(encoded_len(b"a.b~"), 8);
    }

    #[test]
    fn every_single_byte_round_trips() {
        for b in 0..=255u8 {
            let t = enc(&[b]);
            assert_safe(&t);
            assert_eq!(t.len(), encoded_len(&[b]));
            assert_eq!(decode(&t), Some(vec![b]), "byte {b:#04x}");
        }
    }

    #[test]
    fn invalid_tokens_are_refused() {
        for bad in [
            &b""[..],
            b"~",
            b"~4",
            b"a~",
            b"~2e",      // lower-case hex
            b"~41",      // 'A' escaped: a second spelling of "A"
            b"~5F",      // '_' escaped
            b"~2D",      // '-' escaped
            b"~G0",      // not hex
            b"a.b",      // '.' unescaped
            b"a b",      // space
            b"*",        // wildcard
            b">",        // wildcard
            b"\xc3\xa9", // raw non-ASCII
            b"~7",
        ] {
            assert_eq!(decode(bad), None, "{:?}", String::from_utf8_lossy(bad));
            assert_eq!(decode_cow(bad), None);
            assert!(!is_valid(bad));
        }
        // A failed decode leaves the buffer as it was.
        let mut out = b"keep".to_vec();
        assert!(!decode_into(b"ab~2", &mut out));
        assert_eq!(out, b"keep");
        assert!(decode_into(b"ab~2E", &mut out));
        assert_eq!(out, b"keepab.");
    }

    #[test]
    fn longest_target_fits_max_token() {
        let t = vec![b'.'; MAX_TARGET];
        let e = enc(&t);
        assert_eq!(e.len(), MAX_TOKEN);
        assert_eq!(decode(&e), Some(t));
    }

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    #[test]
    fn random_bytes_round_trip_and_tokens_are_canonical() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..20_000 {
            let len = 1 + (rng.next() % 300) as usize;
            // Half the rounds draw from a small alphabet rich in the interesting bytes.
            let target: Vec<u8> = (0..len)
                .map(|_| {
                    let r = rng.next();
                    if round % 2 == 0 {
                        b"aZ9_-~.*> \x00\x7f\x80\xffA"[(r % 15) as usize]
                    } else {
                        r as u8
                    }
                })
                .collect();
            let token = enc(&target);
            assert_safe(&token);
            assert_eq!(token.len(), encoded_len(&target));
            assert_eq!(decode(&token).as_deref(), Some(&target[..]));
        }
        // The other way round: random strings over the token alphabet decode only when
        // encoding the result gives them back (one spelling per target).
        let alphabet = b"aZ9_-~0123456789ABCDEFabcdef.";
        for _ in 0..50_000 {
            let len = 1 + (rng.next() % 12) as usize;
            let token: Vec<u8> = (0..len)
                .map(|_| alphabet[(rng.next() % alphabet.len() as u64) as usize])
                .collect();
            let t = decode(&token);
            assert_eq!(decode_cow(&token).as_deref(), t.as_deref());
            if let Some(t) = t {
                assert_eq!(enc(&t), token);
            }
        }
    }
}
