//! A fake sandbox root for the unit tests of this module.

use std::os::unix::fs::symlink;

use super::path::SandboxPath;
use super::root::Root;

/// A fake sandbox root and, beside it, a host directory holding a secret.
pub(super) struct Fixture {
    pub(super) root_dir: tempfile::TempDir,
    pub(super) host: tempfile::TempDir,
}

impl Fixture {
    pub(super) fn new() -> Fixture {
        let root_dir = tempfile::tempdir().unwrap();
        let host = tempfile::tempdir().unwrap();
        std::fs::write(host.path().join("secret"), "host secret").unwrap();
        let r = root_dir.path();
        std::fs::create_dir_all(r.join("etc")).unwrap();
        std::fs::write(r.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        symlink(host.path().join("secret"), r.join("abs")).unwrap();
        symlink(host.path(), r.join("hostdir")).unwrap();
        symlink("../../../../../../../..", r.join("up")).unwrap();
        symlink("chain1", r.join("chain0")).unwrap();
        symlink("/up/..", r.join("chain1")).unwrap();
        Fixture { root_dir, host }
    }

    pub(super) fn root(&self) -> Root {
        Root::open_dir(self.root_dir.path(), None).unwrap()
    }

    pub(super) fn host_secret(&self) -> String {
        self.host.path().join("secret").display().to_string()
    }

    pub(super) fn escapes(&self) -> Vec<String> {
        let h = self.host.path().display().to_string();
        vec![
            "/abs".into(),
            format!("/hostdir/secret"),
            format!("/up{}", self.host_secret()),
            format!("/../../../..{}", self.host_secret()),
            format!("/chain0{}", self.host_secret()),
            format!("/etc/../../..{h}/secret"),
        ]
    }

    pub(super) fn assert_host_intact(&self) {
        assert_eq!(
            std::fs::read_to_string(self.host.path().join("secret")).unwrap(),
            "host secret"
        );
        let names: Vec<_> = std::fs::read_dir(self.host.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["secret"]);
    }
}

pub(super) fn path(p: &str) -> SandboxPath {
    SandboxPath::parse("path", p).unwrap()
}
