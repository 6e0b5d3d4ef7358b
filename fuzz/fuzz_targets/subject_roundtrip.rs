//! Target to NATS subject token and back (`middleman::cluster::subject`): for any
//! non-empty input, decode(encode(x)) == x and the token is one safe NATS subject token
//! (no `.`, whitespace, `*`, `>`, control or non-ASCII byte); and any token that decodes
//! is exactly what encoding its target gives (one spelling per target).
#![no_main]

use libfuzzer_sys::fuzz_target;
use middleman::cluster::proto::valid_subject;
use middleman::cluster::subject::{decode, decode_into, encode, encoded_len, is_valid};

fuzz_target!(|data: &[u8]| {
    if !data.is_empty() {
        let mut token = b"prefix.".to_vec();
        encode(data, &mut token);
        let token = &token[b"prefix.".len()..];
        assert_eq!(token.len(), encoded_len(data));
        assert!(token.len() <= 3 * data.len());
        for &b in token {
            assert!(
                !matches!(b, b'.' | b' ' | b'\t' | b'\r' | b'\n' | b'*' | b'>')
                    && (0x21..0x7f).contains(&b),
                "byte {b:#04x} in token"
            );
        }
        assert!(valid_subject(token, false), "not a literal subject token");
        assert_eq!(decode(token).as_deref(), Some(data), "round trip");
        assert!(is_valid(token));
    }
    match decode(data) {
        Some(target) => {
            let mut again = Vec::new();
            encode(&target, &mut again);
            assert_eq!(again, data, "a second spelling decoded");
        }
        None => {
            let mut out = b"x".to_vec();
            assert!(!decode_into(data, &mut out));
            assert_eq!(out, b"x", "a failed decode wrote");
        }
    }
});
