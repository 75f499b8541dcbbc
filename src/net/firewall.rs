//! The egress firewall: iptables rules in the host's network namespace (where sandboxd runs),
//! outside every sandbox's reach.
//!
//! One chain per sandboxd instance (`SBXD-<instance>`) is jumped to first from INPUT and FORWARD.
//! It sends each packet a sandbox puts on the bridge (matched by the host end of the sandbox's
//! veth, which the sandbox cannot forge: needs the kernel's bridge netfilter, on by default) to
//! that sandbox's own chain (`SBXD-<instance>-<sandbox>`), whose rules come from
//! [`super::policy::egress_rules`]. Below the dispatch rules it admits replies and port-forwarded
//! connections towards the bridge, so that a host whose FORWARD policy is DROP still works.
//!
//! Changes go through `iptables-restore --noflush`: one atomic transaction per change.

use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use crate::error::{Error, Result};

const SAVE: &str = "iptables-save";
const RESTORE: &str = "iptables-restore";

/// The egress firewall of one sandboxd instance.
#[derive(Debug)]
pub struct Firewall {
    top: String,
    bridge: Option<String>,
    /// Serialises read-modify-write changes of our chains.
    lock: Mutex<bool>,
}

impl Firewall {
    /// The firewall of instance `instance` (a short hex tag), whose sandboxes hang off `bridge`.
    pub fn new(instance: &str, bridge: Option<String>) -> Firewall {
        Firewall {
            top: format!("SBXD-{instance}"),
            bridge,
            lock: Mutex::new(false),
        }
    }

    /// The chain of sandbox `id` (iptables limits names to 28 characters, hence the hash).
    pub fn chain_for(&self, id: &str) -> String {
        format!(
            "{}-{}",
            self.top,
            &crate::util::sha256_hex(id.as_bytes())[..12]
        )
    }

    /// Installs the sandbox's chain with `rules` (from [`super::policy::egress_rules`] for
    /// [`Firewall::chain_for`]) and sends what arrives from `veth` to it. Replaces an earlier
    /// chain of the same sandbox.
    pub async fn add(&self, id: &str, veth: &str, rules: &[String]) -> Result<()> {
        let mut ready = self.lock.lock().await;
        if !*ready {
            self.ensure_base().await?;
            *ready = true;
        }
        let chain = self.chain_for(id);
        let mut lines = vec![format!(":{chain} - [0:0]")];
        lines.extend(rules.iter().cloned());
        lines.push(format!(
            "-I {} 1 -m physdev --physdev-in {veth} -j {chain}",
            self.top
        ));
        restore(&lines).await
    }

    /// Removes sandbox `id`'s chain and the rules jumping to it. Idempotent.
    pub async fn remove(&self, id: &str) -> Result<()> {
        let _guard = self.lock.lock().await;
        self.remove_chains(&[self.chain_for(id)]).await
    }

    /// Removes the chains of sandboxes not in `live` (left by a crash). Returns how many.
    pub async fn sweep(&self, live: &[String]) -> Result<usize> {
        let _guard = self.lock.lock().await;
        let keep: Vec<String> = live.iter().map(|id| self.chain_for(id)).collect();
        let prefix = format!("{}-", self.top);
        let stale: Vec<String> = parse_save(&save().await?)
            .chains
            .into_iter()
            .filter(|c| c.starts_with(&prefix) && !keep.contains(c))
            .collect();
        self.remove_chains(&stale).await?;
        Ok(stale.len())
    }

    async fn remove_chains(&self, chains: &[String]) -> Result<()> {
        if chains.is_empty() {
            return Ok(());
        }
        let state = parse_save(&save().await?);
        let mut lines = Vec::new();
        for rule in &state.rules {
            let words: Vec<&str> = rule.split_whitespace().collect();
            let jumps_to_ours = words.len() > 2
                && words[1] == self.top
                && words[words.len() - 2] == "-j"
                && chains.iter().any(|c| c == words[words.len() - 1]);
            if jumps_to_ours {
                lines.push(format!("-D{}", &rule[2..]));
            }
        }
        for chain in chains.iter().filter(|c| state.chains.contains(c)) {
            lines.push(format!("-F {chain}"));
            lines.push(format!("-X {chain}"));
        }
        if lines.is_empty() {
            return Ok(());
        }
        restore(&lines).await
    }

    /// Creates the instance chain and its jumps from INPUT and FORWARD when missing, after
    /// making sure bridged packets pass iptables at all.
    async fn ensure_base(&self) -> Result<()> {
        ensure_bridge_netfilter().await?;
        let state = parse_save(&save().await?);
        let top = &self.top;
        let mut lines = Vec::new();
        if !state.chains.contains(top) {
            lines.push(format!(":{top} - [0:0]"));
            if let Some(br) = &self.bridge {
                lines.push(format!(
                    "-A {top} -o {br} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
                ));
                lines.push(format!(
                    "-A {top} -o {br} -m conntrack --ctstate DNAT -j ACCEPT"
                ));
            }
        }
        for builtin in ["INPUT", "FORWARD"] {
            let jump = format!("-A {builtin} -j {top}");
            if !state.rules.contains(&jump) {
                lines.push(format!("-I {builtin} 1 -j {top}"));
            }
        }
        if lines.is_empty() {
            return Ok(());
        }
        restore(&lines).await
    }
}

/// Where the kernel's bridge netfilter says whether bridged IPv4 packets pass iptables (per
/// network namespace).
const BRIDGE_NF_CALL_IPTABLES: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

/// The physdev match that ties a packet to its sandbox sees bridged packets only with the
/// kernel's bridge netfilter on; without it no egress rule would ever match, so BRIDGE sandboxes
/// are refused rather than left unpoliced. Turns it on when the module is there but off.
async fn ensure_bridge_netfilter() -> Result<()> {
    match tokio::fs::read_to_string(BRIDGE_NF_CALL_IPTABLES).await {
        Ok(v) if v.trim() == "1" => Ok(()),
        Ok(_) => tokio::fs::write(BRIDGE_NF_CALL_IPTABLES, "1")
            .await
            .map_err(|e| Error::io(format!("turning on {BRIDGE_NF_CALL_IPTABLES}"), e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::FailedPrecondition(
            "the kernel's bridge netfilter is not loaded (`modprobe br_netfilter`); without it \
             the egress policy of BRIDGE sandboxes cannot be enforced"
                .into(),
        )),
        Err(e) => Err(Error::io(format!("reading {BRIDGE_NF_CALL_IPTABLES}"), e)),
    }
}

/// The chains and rules of an `iptables-save -t filter` dump.
#[derive(Debug, Default, PartialEq)]
struct SaveState {
    chains: Vec<String>,
    rules: Vec<String>,
}

fn parse_save(text: &str) -> SaveState {
    let mut state = SaveState::default();
    for line in text.lines() {
        if let Some(decl) = line.strip_prefix(':') {
            if let Some(name) = decl.split_whitespace().next() {
                state.chains.push(name.to_string());
            }
        } else if line.starts_with("-A ") {
            state.rules.push(line.trim_end().to_string());
        }
    }
    state
}

async fn save() -> Result<String> {
    let out = tokio::process::Command::new(SAVE)
        .args(["-t", "filter"])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(missing_tool(SAVE))?;
    if !out.status.success() {
        return Err(Error::Internal(format!(
            "{SAVE} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Applies `lines` to the filter table in one transaction.
async fn restore(lines: &[String]) -> Result<()> {
    let mut input = String::from("*filter\n");
    for l in lines {
        input.push_str(l);
        input.push('\n');
    }
    input.push_str("COMMIT\n");
    let mut child = tokio::process::Command::new(RESTORE)
        .args(["-w", "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(missing_tool(RESTORE))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    stdin
        .write_all(input.as_bytes())
        .await
        .map_err(|e| Error::io(format!("writing to {RESTORE}"), e))?;
    drop(stdin);
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| Error::io(format!("waiting for {RESTORE}"), e))?;
    if !out.status.success() {
        return Err(Error::Internal(format!(
            "{RESTORE} failed ({}): {}; input was:\n{input}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn missing_tool(name: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::FailedPrecondition(format!(
                "{name} is not installed on this node; BRIDGE networking needs iptables"
            ))
        } else {
            Error::io(format!("running {name}"), e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_output_parses_into_chains_and_rules() {
        let text = "# Generated\n*filter\n:INPUT ACCEPT [0:0]\n:SBXD-ab - [0:0]\n-A INPUT -j SBXD-ab\n-A SBXD-ab -m physdev --physdev-in veth1 -j SBXD-ab-c\nCOMMIT\n";
        let s = parse_save(text);
        assert_eq!(s.chains, ["INPUT", "SBXD-ab"]);
        assert_eq!(
            s.rules,
            [
                "-A INPUT -j SBXD-ab",
                "-A SBXD-ab -m physdev --physdev-in veth1 -j SBXD-ab-c"
            ]
        );
    }

    #[test]
    fn chain_names_fit_iptables() {
        let fw = Firewall::new("0123abcd", None);
        let chain = fw.chain_for(&"x".repeat(63));
        assert!(chain.len() <= 28, "{chain} is too long");
        assert_ne!(chain, fw.chain_for("y"));
    }
}
