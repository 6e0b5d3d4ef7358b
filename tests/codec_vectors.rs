//! The codec vectors (`tests/vectors/{decode,encode}.json`, a copy of the project's shared
//! vectors; docs/protocol.md §2 and §7) run against `middleman::protocol`.
//!
//! Decode cases are fed in one piece, one byte at a time, and split in two at every
//! position (sampled for long inputs); every way of feeding must give exactly the expected
//! outcomes and the expected "needs more bytes" flag. Encode cases must produce exactly the
//! expected bytes, and those bytes must decode back to the message.
//!
//! The vectors are the contract: a missing or unreadable file fails the test, it never
//! skips.

use base64::Engine as _;
use middleman::protocol::{encode_into, Decoded, Decoder, Limits};
use serde_json::Value;

const DECODE_JSON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/decode.json");
const ENCODE_JSON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/encode.json");

/// Inputs longer than this are split at sampled positions only.
const FULL_SPLIT_MAX: usize = 2000;

fn load(path: &str) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "cannot read the codec vectors at {path}: {e}\n\
             (they are part of the repository: see tests/vectors/README.md)"
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not valid JSON: {e}"))
}

fn b64(text: &str, what: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap_or_else(|e| panic!("{what}: bad base64: {e}"))
}

fn field<'a>(v: &'a Value, key: &str, what: &str) -> &'a Value {
    v.get(key)
        .unwrap_or_else(|| panic!("{what}: missing key {key:?}"))
}

fn str_field<'a>(v: &'a Value, key: &str, what: &str) -> &'a str {
    field(v, key, what)
        .as_str()
        .unwrap_or_else(|| panic!("{what}: {key:?} is not a string"))
}

fn cases<'a>(doc: &'a Value, what: &str) -> &'a Vec<Value> {
    field(doc, "cases", what)
        .as_array()
        .unwrap_or_else(|| panic!("{what}: \"cases\" is not an array"))
}

/// One decoder outcome, owned, in the vectors' terms.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Message {
        cmd: Vec<u8>,
        target: Vec<u8>,
        headers: Vec<(Vec<u8>, Vec<u8>)>,
        body: Vec<u8>,
    },
    Malformed,
    Close(u16),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = |b: &[u8]| format!("{:?}", String::from_utf8_lossy(b));
        match self {
            Outcome::Message {
                cmd,
                target,
                headers,
                body,
            } => {
                write!(f, "message {} {} [", s(cmd), s(target))?;
                for (i, (n, v)) in headers.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{}={}", s(n), s(v))?;
                }
                write!(f, "] body {}", s(body))
            }
            Outcome::Malformed => f.write_str("malformed"),
            Outcome::Close(code) => write!(f, "close {code}"),
        }
    }
}

fn show(outcomes: &[Outcome]) -> String {
    let parts: Vec<String> = outcomes.iter().map(|o| o.to_string()).collect();
    format!("[{}]", parts.join("; "))
}

fn expected_message(m: &Value, what: &str) -> Outcome {
    let headers = field(m, "headers", what)
        .as_array()
        .unwrap_or_else(|| panic!("{what}: headers is not an array"))
        .iter()
        .map(|h| {
            let pair = h
                .as_array()
                .filter(|p| p.len() == 2)
                .unwrap_or_else(|| panic!("{what}: a header is not [name, value]"));
            let s = |v: &Value| {
                v.as_str()
                    .unwrap_or_else(|| panic!("{what}: header part is not a string"))
                    .as_bytes()
                    .to_vec()
            };
            (s(&pair[0]), s(&pair[1]))
        })
        .collect();
    Outcome::Message {
        cmd: str_field(m, "cmd", what).as_bytes().to_vec(),
        target: str_field(m, "target", what).as_bytes().to_vec(),
        headers,
        body: b64(str_field(m, "body_b64", what), what),
    }
}

fn expected_outcomes(case: &Value, what: &str) -> Vec<Outcome> {
    field(case, "expect", what)
        .as_array()
        .unwrap_or_else(|| panic!("{what}: expect is not an array"))
        .iter()
        .map(|item| {
            if let Some(m) = item.get("message") {
                expected_message(m, what)
            } else if let Some(e) = item.get("error") {
                assert_eq!(e.as_str(), Some("malformed"), "{what}: unknown error {e}");
                Outcome::Malformed
            } else if let Some(c) = item.get("close") {
                let code = c
                    .as_u64()
                    .and_then(|c| u16::try_from(c).ok())
                    .unwrap_or_else(|| panic!("{what}: bad close code {c}"));
                Outcome::Close(code)
            } else {
                panic!("{what}: unknown outcome {item}")
            }
        })
        .collect()
}

fn limits_from(top: &Value, case: Option<&Value>, what: &str) -> Limits {
    let get = |key: &str| -> usize {
        let v = case
            .and_then(|c| c.get(key))
            .or_else(|| top.get(key))
            .unwrap_or_else(|| panic!("{what}: no limit {key:?}"));
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or_else(|| panic!("{what}: limit {key:?} is not a size: {v}"))
    };
    // `max_target` is fixed at 255 by §2 and not a decoder setting: it is ignored.
    Limits {
        max_message: get("max_message"),
        max_line: get("max_line"),
        max_headers: get("max_headers"),
    }
}

/// Drain every outcome the decoder can give now. Returns true after a close.
fn drain(d: &mut Decoder, out: &mut Vec<Outcome>) -> bool {
    loop {
        match d.next() {
            Ok(Some(Decoded::Message(m))) => out.push(Outcome::Message {
                cmd: m.cmd.to_vec(),
                target: m.target.to_vec(),
                headers: m.headers().map(|(n, v)| (n.to_vec(), v.to_vec())).collect(),
                body: m.body.to_vec(),
            }),
            Ok(Some(Decoded::Malformed(_))) => out.push(Outcome::Malformed),
            Ok(None) => return false,
            Err(e) => {
                out.push(Outcome::Close(e.close_code()));
                return true;
            }
        }
    }
}

/// Feed `pieces` in order, collecting outcomes until the input is used up or a close.
/// Returns the outcomes and `needs_more()` after the last byte.
fn run<'a>(limits: Limits, pieces: impl IntoIterator<Item = &'a [u8]>) -> (Vec<Outcome>, bool) {
    let mut d = Decoder::new(limits);
    let mut out = Vec::new();
    for piece in pieces {
        d.feed(piece);
        if drain(&mut d, &mut out) {
            break;
        }
    }
    (out, d.needs_more())
}

/// Where to split an input in two.
fn split_points(len: usize) -> Vec<usize> {
    if len <= FULL_SPLIT_MAX {
        return (1..len).collect();
    }
    let mut v: Vec<usize> = (1..len)
        .filter(|&i| i % 7 == 0 || i <= 64 || i >= len - 64)
        .collect();
    v.dedup();
    v
}

#[test]
fn decode_vectors() {
    let doc = load(DECODE_JSON);
    let top = field(&doc, "limits", "decode.json");
    let cases = cases(&doc, "decode.json");
    let mut run_count = 0usize;
    let mut feeds = 0usize;
    let mut failures: Vec<String> = Vec::new();
    let mut failed_cases = 0usize;
    for (i, case) in cases.iter().enumerate() {
        let name = case
            .get("name")
            .and_then(Value::as_str)
            .map_or_else(|| format!("#{i}"), str::to_owned);
        let what = format!("decode.json case {name}");
        let limits = limits_from(top, case.get("limits"), &what);
        let input = b64(str_field(case, "input_b64", &what), &what);
        let expect = expected_outcomes(case, &what);
        let partial = field(case, "partial", &what)
            .as_bool()
            .unwrap_or_else(|| panic!("{what}: partial is not a bool"));

        let before = failures.len();
        let mut check = |how: String, (got, got_partial): (Vec<Outcome>, bool)| {
            feeds += 1;
            if got != expect || got_partial != partial {
                failures.push(format!(
                    "{what} ({how}):\n    got    {} partial={got_partial}\n    expect {} partial={partial}",
                    show(&got),
                    show(&expect)
                ));
                false
            } else {
                true
            }
        };
        check("one piece".into(), run(limits, [&input[..]]));
        check("byte at a time".into(), run(limits, input.chunks(1)));
        for at in split_points(input.len()) {
            let (a, b) = input.split_at(at);
            // Report only the first failing split of a case.
            if !check(format!("split at {at}"), run(limits, [a, b])) {
                break;
            }
        }
        if failures.len() > before {
            eprintln!("FAIL {name}");
            failed_cases += 1;
        }
        run_count += 1;
    }
    println!(
        "decode vectors: {run_count} of {} cases run ({feeds} feedings), {failed_cases} failed",
        cases.len()
    );
    assert!(
        failures.is_empty(),
        "{failed_cases} decode cases failed ({} feedings):\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(run_count, cases.len(), "every decode case must run");
    assert!(run_count > 0, "decode.json has no cases");
}

#[test]
fn encode_vectors() {
    let doc = load(ENCODE_JSON);
    let cases = cases(&doc, "encode.json");
    let mut run_count = 0usize;
    let mut failures: Vec<String> = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let name = case
            .get("name")
            .and_then(Value::as_str)
            .map_or_else(|| format!("#{i}"), str::to_owned);
        let what = format!("encode.json case {name}");
        let m = field(case, "message", &what);
        let want = expected_message(m, &what);
        let Outcome::Message {
            cmd,
            target,
            headers,
            body,
        } = &want
        else {
            unreachable!()
        };
        let expect = b64(str_field(case, "expect_b64", &what), &what);

        let mut out = Vec::new();
        encode_into(
            &mut out,
            cmd,
            target,
            headers.iter().map(|(n, v)| (&n[..], &v[..])),
            body,
        );
        if out != expect {
            failures.push(format!(
                "{what}: encoded\n    got    {:?}\n    expect {:?}",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&expect)
            ));
        }
        let (back, partial) = run(Limits::default(), [&out[..]]);
        if back != [want.clone()] || partial {
            failures.push(format!(
                "{what}: the encoded bytes decode back as {} partial={partial}",
                show(&back)
            ));
        }
        run_count += 1;
    }
    println!(
        "encode vectors: {run_count} of {} cases run, {} failures",
        cases.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} encode vector failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(run_count, cases.len(), "every encode case must run");
    assert!(run_count > 0, "encode.json has no cases");
}
