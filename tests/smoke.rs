mod common;
use common::*;

#[test]
fn pub_sub_roundtrip() {
    let srv = TestServer::start();
    let mut svc = Peer::service(srv.addr);
    let mut cli = Peer::client(srv.addr);
    svc.send("ESUB", "news", &[], "");
    svc.sync();
    cli.send("SUB", "news", &[], "");
    cli.sync();
    svc.send("PUB", "news", &[("X-A", "1")], "hello\n.dot");
    let m = cli.recv();
    assert_eq!(m.cmd, "PUB");
    assert_eq!(m.target, "news");
    assert_eq!(m.body, "hello\n.dot");
    assert_eq!(m.header("X-A"), Some("1"));
    assert_eq!(m.header("cid"), Some(svc.cid.as_str()));
    assert_eq!(m.header("uid"), Some(""));
}
