//! The command-line client: `middleman sub|pub|req|reply|presence|kick`, on
//! [`crate::client`]; and `middleman lameduck --pid PID`, which signals a server.
//!
//! Output is one message per line on stdout: the body, or with `-v` the command and
//! target, each header and the body, separated by tabs. A connection event (`sub
//! SYS:CONNECT`, `SYS:DISCONNECT`, `SYS:SUB`, `SYS:UNS`; a service key) has an empty body,
//! so its line is the topic and the headers: `SYS:DISCONNECT<TAB>cid: ...<TAB>uid:
//! ...<TAB>role: client<TAB>reason: kicked`. Backslash, tab, CR, LF, other
//! control characters and invalid UTF-8 are escaped (`\\`, `\t`, `\r`, `\n`, `\xNN`), so
//! a line is always exactly one message. Diagnostics go to stderr.
//!
//! Exit codes: 0 ok, 1 the server refused the command or failed the request (e.g. `no
//! responder`, `not permitted`, `responder disconnected`), 2 usage (bad arguments), 3
//! connection or authentication failure (also a connection lost later), 4 timeout (no
//! answer within `--timeout`, or the server's `request timed out`).

use std::io::{self, Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::client::{Client, Error, Message, PRESENCE_MAX};
use crate::config::parse_duration;

/// Exit code: the server refused the command or failed the request.
pub const EXIT_SERVER_ERROR: u8 = 1;
/// Exit code: bad arguments.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: connection or authentication failure.
pub const EXIT_CONNECTION: u8 = 3;
/// Exit code: timeout.
pub const EXIT_TIMEOUT: u8 = 4;

/// Where to connect and with which key.
#[derive(Args, Debug, Clone)]
pub struct ConnArgs {
    /// Server URL.
    #[arg(long, env = "MM_URL", default_value = "ws://127.0.0.1:8765/")]
    pub url: String,
    /// API key (a service key or a client key); required, here or in MM_KEY.
    // Not a clap-required argument: clap's message for a missing one names only
    // `--key <KEY>`, so `run` reports it, naming the environment variable too.
    #[arg(long, env = "MM_KEY", hide_env_values = true, value_name = "KEY")]
    pub key: Option<String>,
}

/// The message (exit 2) when neither `--key` nor `MM_KEY` gives a key.
pub const NO_KEY: &str = "no key: give --key KEY or set the MM_KEY environment variable";

/// `middleman sub TOPIC...`
#[derive(Args, Debug, Clone)]
pub struct SubArgs {
    /// Topics to subscribe to.
    #[arg(required = true)]
    pub topics: Vec<String>,
    /// Exit (0) after this many messages.
    #[arg(long, short = 'n')]
    pub count: Option<u64>,
    /// Print the command, target and headers too.
    #[arg(long, short)]
    pub verbose: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// `middleman pub TOPIC BODY [-H name:value]...`
#[derive(Args, Debug, Clone)]
pub struct PubArgs {
    /// Topic to publish to.
    pub topic: String,
    /// Message body; `-` reads it from stdin.
    pub body: String,
    /// A header `name:value`; repeatable.
    #[arg(short = 'H', long = "header", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// `middleman req TARGET BODY [--timeout 5s]`
#[derive(Args, Debug, Clone)]
pub struct ReqArgs {
    /// Request name.
    pub target: String,
    /// Request body; `-` reads it from stdin.
    pub body: String,
    /// A header `name:value`; repeatable.
    #[arg(short = 'H', long = "header", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// How long to wait for the answer (e.g. 500ms, 5s).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Print the command, target and headers of the answer too.
    #[arg(long, short)]
    pub verbose: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// `middleman reply TARGET --echo`
#[derive(Args, Debug, Clone)]
pub struct ReplyArgs {
    /// Request name to answer (needs a service key).
    pub target: String,
    /// Answer each request with its own body.
    #[arg(long, required_unless_present = "body")]
    pub echo: bool,
    /// Answer each request with this body.
    #[arg(long, conflicts_with = "echo")]
    pub body: Option<String>,
    /// Exit (0) after answering this many requests.
    #[arg(long, short = 'n')]
    pub count: Option<u64>,
    /// Print the command, target and headers of each request too.
    #[arg(long, short)]
    pub verbose: bool,
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// `middleman presence TOPIC [--limit N]`
#[derive(Args, Debug, Clone)]
pub struct PresenceArgs {
    /// The topic (needs a service key).
    pub topic: String,
    /// List at most this many connections (0: the counts alone; at most 10000).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=PRESENCE_MAX as u64))]
    pub limit: u64,
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// `middleman kick CID [--reason R]`
#[derive(Args, Debug, Clone)]
pub struct KickArgs {
    /// The connection id to close (needs a service key).
    pub cid: String,
    /// The close reason the connection sees (default `kicked`; cut to 120 bytes).
    #[arg(long)]
    pub reason: Option<String>,
    #[command(flatten)]
    pub conn: ConnArgs,
}

/// Parse `name:value` (spaces around both trimmed).
pub fn parse_header(s: &str) -> Result<(String, String), String> {
    let Some((n, v)) = s.split_once(':') else {
        return Err(format!("header {s:?} is not name:value"));
    };
    let n = n.trim();
    if n.is_empty() {
        return Err(format!("header {s:?} has no name"));
    }
    Ok((n.to_owned(), v.trim().to_owned()))
}

/// Run `sub`.
pub fn sub(a: SubArgs) -> ExitCode {
    run(&a.conn, |key| {
        let mut c = connect(&a.conn, key)?;
        for t in &a.topics {
            c.subscribe(t)?;
        }
        eprintln!(
            "middleman: subscribed to {} as {}",
            a.topics.join(" "),
            c.cid()
        );
        let mut seen = 0u64;
        while a.count.is_none_or(|n| seen < n) {
            let m = c.recv()?;
            if let Some(e) = m.error() {
                eprintln!("middleman: server error: {e}");
                continue;
            }
            if !print(&m, a.verbose) {
                return Ok(());
            }
            seen += 1;
        }
        Ok(())
    })
}

/// Run `pub`: publish, then wait for the server to have processed it, so a refusal is
/// reported (exit 1).
pub fn publish(a: PubArgs) -> ExitCode {
    run(&a.conn, |key| {
        let body = body_arg(&a.body)?;
        let mut c = connect(&a.conn, key)?;
        c.publish(&a.topic, &pairs(&a.headers), &body)?;
        c.sync()?;
        while let Some(m) = c.recv_timeout(Duration::ZERO)? {
            if let Some(e) = m.error() {
                if e.cmd == "PUB" && e.target == a.topic {
                    return Err(Error::Server(e));
                }
            }
        }
        let _ = c.close();
        Ok(())
    })
}

/// Run `req`: print the answer's body (exit 0) or report the error.
pub fn request(a: ReqArgs) -> ExitCode {
    run(&a.conn, |key| {
        let body = body_arg(&a.body)?;
        let mut c = connect(&a.conn, key)?;
        let res = c.request(&a.target, &pairs(&a.headers), &body, a.timeout)?;
        print(&res, a.verbose);
        let _ = c.close();
        Ok(())
    })
}

/// Run `reply`: answer requests for the target, printing each one.
pub fn reply(a: ReplyArgs) -> ExitCode {
    run(&a.conn, |key| {
        let mut c = connect(&a.conn, key)?;
        c.enable_requests(&a.target)?;
        eprintln!("middleman: answering {} as {}", a.target, c.cid());
        let mut answered = 0u64;
        while a.count.is_none_or(|n| answered < n) {
            let m = c.recv()?;
            if let Some(e) = m.error() {
                eprintln!("middleman: server error: {e}");
                continue;
            }
            if m.cmd != "REQ" || m.target != a.target {
                continue;
            }
            let body = match &a.body {
                Some(b) => b.as_bytes(),
                None => &m.body[..],
            };
            c.reply(&m, &[], body)?;
            answered += 1;
            if !print(&m, a.verbose) {
                return Ok(());
            }
        }
        c.sync()?; // the last answer has left
        let _ = c.close();
        Ok(())
    })
}

/// Run `presence`: a first line `count: N<TAB>users: M` (with `<TAB>truncated: true`
/// and `<TAB>partial: true` when so), then one line per connection, `<cid> <uid>` or
/// `<cid>`, sorted by cid.
pub fn presence(a: PresenceArgs) -> ExitCode {
    run(&a.conn, |key| {
        let mut c = connect(&a.conn, key)?;
        let p = c.presence(&a.topic, a.limit as usize)?;
        let mut out = format!("count: {}\tusers: {}", p.count, p.users);
        if p.truncated {
            out.push_str("\ttruncated: true");
        }
        if p.partial {
            out.push_str("\tpartial: true");
        }
        out.push('\n');
        for m in &p.members {
            let mut line = m.cid.clone();
            if !m.uid.is_empty() {
                line.push(' ');
                line.push_str(&m.uid);
            }
            escape_into(&mut out, line.as_bytes());
            out.push('\n');
        }
        let mut stdout = io::stdout().lock();
        let _ = stdout
            .write_all(out.as_bytes())
            .and_then(|()| stdout.flush());
        let _ = c.close();
        Ok(())
    })
}

/// Run `kick`: close that connection (code 4000); exit 0 once the server took it (a
/// cid that is not connected is no error), 1 if it refused (`bad cid`, `not permitted`).
pub fn kick(a: KickArgs) -> ExitCode {
    run(&a.conn, |key| {
        let mut c = connect(&a.conn, key)?;
        c.kick(&a.cid, a.reason.as_deref())?;
        let _ = c.close();
        Ok(())
    })
}

/// `middleman lameduck --pid PID`
#[derive(Args, Debug, Clone)]
pub struct LameDuckArgs {
    /// The server process to put in lame duck (it must be a middleman process).
    #[arg(long, value_parser = clap::value_parser!(i32).range(2..))]
    pub pid: i32,
}

/// Run `lameduck`: send SIGUSR2 to the server process `pid` (exit 0), after checking it
/// is a middleman process (SIGUSR2 ends most other programs); exit 1 if there is no such
/// process, it is not middleman, or it may not be signalled.
pub fn lameduck(a: LameDuckArgs) -> ExitCode {
    match send_lame_duck(a.pid) {
        Ok(()) => {
            eprintln!("middleman: SIGUSR2 sent to {}: lame duck", a.pid);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("middleman: {e}");
            ExitCode::from(EXIT_SERVER_ERROR)
        }
    }
}

fn send_lame_duck(pid: i32) -> Result<(), String> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map_err(|e| format!("no process {pid}: {e}"))?;
    let comm = comm.trim_end();
    if !comm.starts_with("middleman") {
        return Err(format!(
            "process {pid} is {comm:?}, not middleman: not signalled"
        ));
    }
    // SAFETY: kill(2) with a positive PID (checked: at least 2) signals that one process.
    if unsafe { libc::kill(pid, libc::SIGUSR2) } != 0 {
        return Err(format!(
            "cannot signal process {pid}: {}",
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Run a command with the key (checked first, before stdin is read), and report its
/// error on one line. Connection failures name the URL ([`Error::Connect`] happens only
/// while connecting to it).
fn run(conn: &ConnArgs, f: impl FnOnce(&str) -> Result<(), Error>) -> ExitCode {
    let Some(key) = conn.key.as_deref().filter(|k| !k.trim().is_empty()) else {
        eprintln!("middleman: {NO_KEY}");
        return ExitCode::from(EXIT_USAGE);
    };
    match f(key) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Error::Connect(e)) => {
            eprintln!("middleman: cannot connect to {}: {e}", conn.url);
            ExitCode::from(EXIT_CONNECTION)
        }
        Err(e) => {
            eprintln!("middleman: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn connect(a: &ConnArgs, key: &str) -> Result<Client, Error> {
    Client::connect(&a.url, key)
}

fn body_arg(b: &str) -> Result<Vec<u8>, Error> {
    if b != "-" {
        return Ok(b.as_bytes().to_vec());
    }
    let mut v = Vec::new();
    io::stdin()
        .read_to_end(&mut v)
        .map_err(|e| Error::Invalid(format!("cannot read the body from stdin: {e}")))?;
    Ok(v)
}

fn pairs(h: &[(String, String)]) -> Vec<(&str, &str)> {
    h.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect()
}

/// Print one message as one line; false when stdout is gone (e.g. a closed pipe).
fn print(m: &Message, verbose: bool) -> bool {
    let line = format_line(m, verbose);
    let mut out = io::stdout().lock();
    out.write_all(line.as_bytes())
        .and_then(|()| out.flush())
        .is_ok()
}

/// The output line for `m`, with its line break. A connection event's line, not verbose,
/// is its topic and headers (it has no body).
pub fn format_line(m: &Message, verbose: bool) -> String {
    let mut s = String::new();
    if !verbose && m.event().is_some() {
        escape_into(&mut s, m.target.as_bytes());
        for (n, v) in &m.headers {
            s.push('\t');
            escape_into(&mut s, format!("{n}: {v}").as_bytes());
        }
        s.push('\n');
        return s;
    }
    if verbose {
        escape_into(&mut s, format!("{} {}", m.cmd, m.target).as_bytes());
        for (n, v) in &m.headers {
            s.push('\t');
            escape_into(&mut s, format!("{n}: {v}").as_bytes());
        }
        s.push('\t');
    }
    escape_into(&mut s, &m.body);
    s.push('\n');
    s
}

/// Append `b` with `\\`, `\t`, `\r`, `\n`, other control characters and invalid UTF-8
/// escaped.
pub fn escape_into(s: &mut String, b: &[u8]) {
    for chunk in b.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => s.push_str("\\\\"),
                '\t' => s.push_str("\\t"),
                '\r' => s.push_str("\\r"),
                '\n' => s.push_str("\\n"),
                c if (c as u32) < 0x20 || c == '\x7f' => {
                    s.push_str(&format!("\\x{:02x}", c as u32));
                }
                c => s.push(c),
            }
        }
        for byte in chunk.invalid() {
            s.push_str(&format!("\\x{byte:02x}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        let m = Message {
            cmd: "PUB".into(),
            target: "t".into(),
            headers: vec![("a".into(), "1\t2".into()), ("cid".into(), "x".into())],
            body: b"x\\y\r\nz\x01\xff".to_vec(),
        };
        assert_eq!(format_line(&m, false), "x\\\\y\\r\\nz\\x01\\xff\n");
        assert_eq!(
            format_line(&m, true),
            "PUB t\ta: 1\\t2\tcid: x\tx\\\\y\\r\\nz\\x01\\xff\n"
        );
    }

    #[test]
    fn event_lines() {
        let m = Message {
            cmd: "PUB".into(),
            target: "SYS:DISCONNECT".into(),
            headers: vec![
                ("cid".into(), "x1".into()),
                ("uid".into(), "".into()),
                ("role".into(), "client".into()),
                ("reason".into(), "kicked".into()),
            ],
            body: Vec::new(),
        };
        assert_eq!(
            format_line(&m, false),
            "SYS:DISCONNECT\tcid: x1\tuid: \trole: client\treason: kicked\n"
        );
        assert_eq!(
            format_line(&m, true),
            "PUB SYS:DISCONNECT\tcid: x1\tuid: \trole: client\treason: kicked\t\n"
        );
    }

    #[test]
    fn headers() {
        assert_eq!(parse_header("A: b:c"), Ok(("A".into(), "b:c".into())));
        assert!(parse_header("nocolon").is_err());
        assert!(parse_header(":v").is_err());
    }
}

/// `middleman reload --pid PID`: the server process to signal.
#[derive(Args, Debug, Clone)]
pub struct PidArgs {
    /// The process id of the running server (e.g. `systemctl show -p MainPID middleman`,
    /// or `pidof middleman`).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    pub pid: i32,
}

/// Run `reload`: send SIGHUP to the server, which reads its configuration again and
/// logs what it applied or why it applied nothing. Exit 0 once the signal is sent, 1
/// if it cannot be (no such process, not permitted).
pub fn reload(a: PidArgs) -> ExitCode {
    // clap refuses 0 and negative numbers, which kill(2) would take as process groups.
    // SAFETY: kill(2) with a positive PID and a signal number: no memory is involved.
    let rc = unsafe { libc::kill(a.pid, libc::SIGHUP) };
    if rc == 0 {
        eprintln!(
            "middleman: SIGHUP sent to {}: the server's log tells what it applied",
            a.pid
        );
        ExitCode::SUCCESS
    } else {
        let e = io::Error::last_os_error();
        eprintln!("middleman: cannot signal process {}: {e}", a.pid);
        ExitCode::from(EXIT_SERVER_ERROR)
    }
}
