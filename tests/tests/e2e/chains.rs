use crate::{hop, ssh};
use mitogen::{ConnectError, Router, Sudo};
use mitogen_tests::e2e::{E2e, SUDO_PW};
use mitogen_tests::*;
use std::time::Duration;

per_backend! {
    fn ssh_then_ssh_then_sudo_with_and_without_a_password(b: SshBackend) {
        let e = E2e::get();
        let r = Router::new().unwrap();
        let a = r.ssh(ssh(b, &e, "plain", "key")).unwrap();
        // plain makes the onward connection itself, with the key in its account.
        let mid = r.ssh(hop(b, &e, "noperl", "sudo").via(&a)).unwrap();
        let root = r.sudo(Sudo::new().via(&mid)).unwrap();
        assert_eq!(root.name(), format!("ssh.{}.ssh.{}.sudo.root", e.ip("plain"), e.ip("noperl")));
        assert_eq!(root.call(uids, ()).unwrap(), (0, 0));
        let c = r.ssh(hop(b, &e, "plain", "sudopw").via(&mid)).unwrap();
        let root2 = r.sudo(Sudo::new().password(SUDO_PW).via(&c)).unwrap();
        assert_eq!(root2.call(uids, ()).unwrap(), (0, 0));
        let data = mitogen::Bytes(block(7, 7, 2 << 20));
        assert_eq!(root2.call(echo, (data.clone(),)).unwrap(), data);
    }
    fn sudo_then_ssh(b: SshBackend) {
        let e = E2e::get();
        let r = Router::new().unwrap();
        // The master runs as root here: sudo to root asks nothing.
        let s = r.sudo(Sudo::new().program(crate::agent())).unwrap();
        let c = r.ssh(ssh(b, &e, "plain", "key").via(&s)).unwrap();
        assert_eq!(c.name(), format!("sudo.root.ssh.{}", e.ip("plain")));
        assert_eq!(c.call(add, (6, 7)).unwrap(), 13);
    }
    fn ten_nested_hops(b: SshBackend) {
        let e = E2e::get();
        let r = Router::new().unwrap();
        let mut ctx = r.ssh(ssh(b, &e, "plain", "key")).unwrap();
        let first = ctx.clone();
        let mut pids = vec![("plain", ctx.call(mitogen::builtins::getpid, ()).unwrap())];
        for i in 1..10 {
            let host = if i % 2 == 1 { "noperl" } else { "plain" };
            ctx = r.ssh(hop(b, &e, host, "key").via(&ctx)).unwrap();
            pids.push((host, ctx.call(mitogen::builtins::getpid, ()).unwrap()));
        }
        assert_eq!(ctx.name().matches("ssh.").count(), 10, "{}", ctx.name());
        let data = mitogen::Bytes(block(1, 10, 1 << 20));
        assert_eq!(ctx.call(echo, (data.clone(),)).unwrap(), data);
        // Shutting the first hop down takes the whole chain down on every host.
        first.shutdown(Duration::from_secs(20)).unwrap();
        std::thread::sleep(Duration::from_secs(1));
        for (host, pid) in pids {
            let alive = e.exec(host, &format!("kill -0 {pid} 2>/dev/null && cat /proc/{pid}/cmdline"));
            assert!(
                alive.is_empty() || !alive.starts_with("mitogen:"),
                "{pid} on {host} still runs: {alive}"
            );
        }
    }
    fn an_error_on_an_intermediary_names_that_host(b: SshBackend) {
        let e = E2e::get();
        let r = Router::new().unwrap();
        let a = r.ssh(ssh(b, &e, "plain", "key")).unwrap();
        match r.ssh(hop(b, &e, "noperl", "key").port(2).via(&a)).unwrap_err() {
            ConnectError::Via { via, message } => {
                assert_eq!(via, a.name());
                assert!(message.contains("refused"), "{message}");
            }
            other => panic!("unexpected {other:?}"),
        }
        // The intermediary still works.
        assert_eq!(a.call(add, (1, 1)).unwrap(), 2);
    }
}
