//! The sandbox firewall: iptables and ebtables rules in the host's network namespace (where
//! sandboxd runs), outside every sandbox's reach.
//!
//! iptables: one chain per sandboxd instance (`SBXD-<instance>`) is jumped to first from INPUT,
//! FORWARD and OUTPUT. It sends each packet a sandbox puts on the bridge (matched by the host
//! end of the sandbox's veth, which the sandbox cannot forge: needs the kernel's bridge
//! netfilter, on by default) to that sandbox's own chain (`SBXD-<instance>-<sandbox>`), whose
//! rules come from [`super::policy::egress_rules`]. Below the dispatch rules it admits replies
//! and port-forwarded connections towards the bridge and rejects every other connection to it:
//! a sandbox is reached only through its published ports, or by a sandbox whose own chain
//! admits it.
//!
//! ebtables: the same names in the bridge's filter table send every frame entering the bridge
//! from a sandbox's veth to that sandbox's guard chain ([`super::policy::guard_rules`]): its
//! own MAC, and ARP and IPv4 from its own address, or the frame is dropped.
//!
//! Changes go through `iptables-restore --noflush` and `ebtables-restore --noflush`: one atomic
//! transaction per change and table (a chain declared in one is flushed and refilled in the
//! same transaction, so replacing a policy leaves no moment without rules).
//! [`Firewall::repair`] notices rules someone removed and puts them back.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::process::Stdio;

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;

use crate::error::{Error, Result};

/// The two tables sandboxd keeps rules in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Table {
    /// iptables' filter table: the egress policy and ingress.
    Ip,
    /// ebtables' filter table: the anti-spoofing guard.
    Eb,
}

impl Table {
    fn save(self) -> (&'static str, &'static [&'static str]) {
        match self {
            Table::Ip => ("iptables-save", &["-t", "filter"]),
            Table::Eb => ("ebtables-save", &[]),
        }
    }

    fn restore(self) -> (&'static str, &'static [&'static str]) {
        match self {
            Table::Ip => ("iptables-restore", &["-w", "--noflush"]),
            Table::Eb => ("ebtables-restore", &["--noflush"]),
        }
    }

    /// How a chain is declared in a restore file (which flushes it when it exists).
    fn declare(self, chain: &str) -> String {
        match self {
            Table::Ip => format!(":{chain} - [0:0]"),
            Table::Eb => format!(":{chain} RETURN"),
        }
    }
}

/// What ties a running sandbox to its rules: the host end of its veth, its MAC and address.
/// Kept with the sandbox (a label) so that its rules can be rebuilt after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Guard {
    /// The host-side veth interface.
    pub veth: String,
    /// The MAC of the sandbox's interface.
    pub mac: String,
    /// The sandbox's address.
    pub ip: Ipv4Addr,
    /// The prefix length of its network (the sandbox subnet).
    pub prefix: u8,
}

/// What [`Firewall::repair`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Everything was in place.
    Intact,
    /// Rules were missing or changed, and were put back.
    Restored,
}

/// The sandbox firewall of one sandboxd instance.
#[derive(Debug)]
pub struct Firewall {
    top: String,
    bridge: Option<String>,
    /// Serialises read-modify-write changes of our chains, and remembers what they held when
    /// last seen whole (by key: table and chain), to notice changes made behind our back.
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    base_ready: bool,
    seen: HashMap<(Table, String), Vec<String>>,
}

impl Firewall {
    /// The firewall of instance `instance` (a short hex tag), whose sandboxes hang off `bridge`.
    pub fn new(instance: &str, bridge: Option<String>) -> Firewall {
        Firewall {
            top: format!("SBXD-{instance}"),
            bridge,
            state: Mutex::new(State::default()),
        }
    }

    /// The bridge whose ports the sandboxes are, when known.
    pub fn bridge(&self) -> Option<&str> {
        self.bridge.as_deref()
    }

    /// The chain of sandbox `key` (iptables limits names to 28 characters, hence the hash).
    pub fn chain_for(&self, key: &str) -> String {
        format!(
            "{}-{}",
            self.top,
            &crate::util::sha256_hex(key.as_bytes())[..12]
        )
    }

    /// Installs sandbox `key`'s chains, `rules` (from [`super::policy::egress_rules`] for
    /// [`Firewall::chain_for`]) and its anti-spoofing guard, and sends what arrives from its
    /// veth to them. On failure the caller removes what may have been made ([`Firewall::remove`]).
    pub async fn add(&self, key: &str, guard: &Guard, rules: &[String]) -> Result<()> {
        let mut state = self.state.lock().await;
        if !state.base_ready {
            self.ensure_base().await?;
            state.base_ready = true;
        }
        let chain = self.chain_for(key);
        let (ip_lines, eb_lines) = (
            self.ip_lines(&chain, guard, rules, true),
            self.eb_lines(&chain, guard, true),
        );
        // Two tables, two tools: run side by side, each its own transaction.
        let (ip, eb) = tokio::join!(restore(Table::Ip, &ip_lines), restore(Table::Eb, &eb_lines));
        ip.and(eb)
    }

    /// Replaces sandbox `key`'s egress `rules` in one transaction: each packet meets either the
    /// old rules or the new ones, never none.
    pub async fn replace(&self, key: &str, rules: &[String]) -> Result<()> {
        let mut state = self.state.lock().await;
        let chain = self.chain_for(key);
        let mut lines = vec![Table::Ip.declare(&chain)];
        lines.extend(rules.iter().cloned());
        restore(Table::Ip, &lines).await?;
        state.seen.remove(&(Table::Ip, chain));
        Ok(())
    }

    fn ip_lines(&self, chain: &str, guard: &Guard, rules: &[String], jump: bool) -> Vec<String> {
        let mut lines = vec![Table::Ip.declare(chain)];
        lines.extend(rules.iter().cloned());
        if jump {
            lines.push(format!(
                "-I {} 1 -m physdev --physdev-in {} -j {chain}",
                self.top, guard.veth
            ));
        }
        lines
    }

    fn eb_lines(&self, chain: &str, guard: &Guard, jump: bool) -> Vec<String> {
        let mut lines = vec![Table::Eb.declare(chain)];
        lines.extend(super::policy::guard_rules(chain, &guard.mac, guard.ip));
        if jump {
            lines.push(format!("-I {} 1 -i {} -j {chain}", self.top, guard.veth));
        }
        lines
    }

    /// Removes sandbox `key`'s chains and the rules jumping to them. Idempotent.
    pub async fn remove(&self, key: &str) -> Result<()> {
        let mut state = self.state.lock().await;
        let chain = self.chain_for(key);
        state.seen.retain(|(_, c), _| *c != chain);
        let chains = [chain];
        let (ip, eb) = tokio::join!(
            self.remove_chains(Table::Ip, &chains),
            self.remove_chains(Table::Eb, &chains),
        );
        ip.and(eb)
    }

    /// Removes the chains of sandboxes not in `live` (left by a crash). Returns how many.
    pub async fn sweep(&self, live: &[String]) -> Result<usize> {
        let mut state = self.state.lock().await;
        let keep: Vec<String> = live.iter().map(|key| self.chain_for(key)).collect();
        let prefix = format!("{}-", self.top);
        let mut swept = 0;
        for table in [Table::Ip, Table::Eb] {
            let stale: Vec<String> = parse_save(&save(table).await?)
                .chains
                .into_iter()
                .filter(|c| c.starts_with(&prefix) && !keep.contains(c))
                .collect();
            self.remove_chains(table, &stale).await?;
            swept += stale.len();
            state
                .seen
                .retain(|(t, c), _| *t != table || !stale.contains(c));
        }
        Ok(swept)
    }

    /// Puts back the instance's base rules if someone removed them. Called for running
    /// sandboxes, so the base is made here too after a restart.
    pub async fn repair_base(&self) -> Result<Repair> {
        let mut state = self.state.lock().await;
        let repair = self.ensure_base().await?;
        state.base_ready = true;
        Ok(repair)
    }

    /// Checks that running sandbox `key`'s chains hold `rules` and its guard and are jumped to,
    /// and puts back whatever someone flushed, removed or changed.
    pub async fn repair(&self, key: &str, guard: &Guard, rules: &[String]) -> Result<Repair> {
        let mut state = self.state.lock().await;
        let chain = self.chain_for(key);
        let mut outcome = Repair::Intact;
        for table in [Table::Ip, Table::Eb] {
            let (want_rules, jump) = match table {
                Table::Ip => (
                    rules.len(),
                    format!(
                        "-A {} -m physdev --physdev-in {} -j {chain}",
                        self.top, guard.veth
                    ),
                ),
                Table::Eb => (
                    super::policy::guard_rules(&chain, &guard.mac, guard.ip).len(),
                    format!("-A {} -i {} -j {chain}", self.top, guard.veth),
                ),
            };
            let now = parse_save(&save(table).await?);
            let present: Vec<String> = now
                .rules
                .iter()
                .filter(|r| r.starts_with(&format!("-A {chain} ")))
                .cloned()
                .collect();
            let has_chain = now.chains.contains(&chain);
            let has_jump = now.rules.contains(&jump);
            let key = (table, chain.clone());
            let whole = has_chain && has_jump && present.len() == want_rules;
            let unchanged = state.seen.get(&key).is_none_or(|seen| *seen == present);
            if whole && unchanged {
                state.seen.insert(key, present);
                continue;
            }
            let lines = match table {
                Table::Ip => self.ip_lines(&chain, guard, rules, !has_jump),
                Table::Eb => self.eb_lines(&chain, guard, !has_jump),
            };
            restore(table, &lines).await?;
            let after = parse_save(&save(table).await?)
                .rules
                .into_iter()
                .filter(|r| r.starts_with(&format!("-A {chain} ")))
                .collect();
            state.seen.insert(key, after);
            outcome = Repair::Restored;
        }
        Ok(outcome)
    }

    async fn remove_chains(&self, table: Table, chains: &[String]) -> Result<()> {
        if chains.is_empty() {
            return Ok(());
        }
        let state = parse_save(&save(table).await?);
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
        restore(table, &lines).await
    }

    /// The rules below the dispatch rules of the instance chain: towards the bridge, replies
    /// and port forwards pass, any other connection is refused.
    fn ingress_rules(&self) -> Vec<String> {
        let top = &self.top;
        match &self.bridge {
            None => Vec::new(),
            Some(br) => vec![
                format!("-A {top} -o {br} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"),
                format!("-A {top} -o {br} -m conntrack --ctstate DNAT -j ACCEPT"),
                format!("-A {top} -o {br} -j REJECT --reject-with icmp-admin-prohibited"),
            ],
        }
    }

    /// Creates the instance chains and their jumps where missing, after making sure bridged
    /// packets pass iptables at all; puts back ingress rules someone removed.
    async fn ensure_base(&self) -> Result<Repair> {
        ensure_bridge_netfilter().await?;
        let mut outcome = Repair::Intact;
        let top = &self.top;
        for table in [Table::Ip, Table::Eb] {
            let state = parse_save(&save(table).await?);
            let mut lines = Vec::new();
            if !state.chains.contains(top) {
                lines.push(table.declare(top));
            }
            let builtins: &[&str] = match table {
                Table::Ip => &["INPUT", "FORWARD", "OUTPUT"],
                Table::Eb => &["INPUT", "FORWARD"],
            };
            for builtin in builtins {
                let jump = format!("-A {builtin} -j {top}");
                if !state.rules.contains(&jump) {
                    lines.push(format!("-I {builtin} 1 -j {top}"));
                }
            }
            if table == Table::Ip {
                let ingress = self.ingress_rules();
                if !ingress.iter().all(|r| state.rules.contains(r)) {
                    // Out of order or partly gone: all of them again, in order, at the end.
                    for r in ingress.iter().filter(|r| state.rules.contains(r)) {
                        lines.push(format!("-D{}", &r[2..]));
                    }
                    lines.extend(ingress);
                }
            }
            if !lines.is_empty() {
                restore(table, &lines).await?;
                outcome = Repair::Restored;
            }
        }
        Ok(outcome)
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

async fn save(table: Table) -> Result<String> {
    let (tool, args) = table.save();
    let out = tokio::process::Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(missing_tool(tool))?;
    if !out.status.success() {
        return Err(Error::Internal(format!(
            "{tool} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Applies `lines` to `table`'s filter table in one transaction.
async fn restore(table: Table, lines: &[String]) -> Result<()> {
    let (tool, args) = table.restore();
    let mut input = String::from("*filter\n");
    for l in lines {
        input.push_str(l);
        input.push('\n');
    }
    input.push_str("COMMIT\n");
    let mut child = tokio::process::Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(missing_tool(tool))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    // A tool that fails early stops reading (EPIPE here): its own exit status and message
    // below say why, so a failed write is reported only if the tool then claims success.
    let written = stdin.write_all(input.as_bytes()).await;
    drop(stdin);
    let out = child
        .wait_with_output()
        .await
        .map_err(|e| Error::io(format!("waiting for {tool}"), e))?;
    if out.status.success() {
        written.map_err(|e| Error::io(format!("writing to {tool}"), e))?;
    } else {
        return Err(Error::Internal(format!(
            "{tool} failed ({}): {}; input was:\n{input}",
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
                "{name} is not installed on this node; BRIDGE networking needs iptables and ebtables"
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
