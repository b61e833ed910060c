//! Who may talk to the daemon: its own user, root, and members of the configured socket group.
//!
//! The socket's file mode already keeps others out; this check is the second lock on the door,
//! for sockets whose mode was loosened (a `SocketMode=` in a unit, a hand `chmod`) and for the
//! instant between bind and chmod.

use std::path::PathBuf;

use crate::passwd::{self, Group};

#[derive(Debug, Clone)]
pub(crate) struct AccessPolicy {
    daemon_uid: u32,
    group: Option<Group>,
    passwd_file: PathBuf,
    group_file: PathBuf,
}

/// The peer as the kernel reports it (SO_PEERCRED), not as it claims to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Peer {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) pid: Option<i32>,
}

impl AccessPolicy {
    pub(crate) fn new(daemon_uid: u32, group: Option<Group>) -> Self {
        Self {
            daemon_uid,
            group,
            passwd_file: "/etc/passwd".into(),
            group_file: "/etc/group".into(),
        }
    }

    pub(crate) fn group(&self) -> Option<&Group> {
        self.group.as_ref()
    }

    /// `Err` carries the message the refused peer is sent. `groups`: the peer's
    /// supplementary groups as the kernel reported them.
    pub(crate) fn check(&self, peer: Peer, groups: &[u32]) -> Result<(), String> {
        if peer.uid == 0 || peer.uid == self.daemon_uid {
            return Ok(());
        }
        if let Some(group) = &self.group
            && (groups.contains(&group.gid) || self.is_member(peer, group))
        {
            return Ok(());
        }
        let allowed = match &self.group {
            Some(group) => format!(
                "uid {}, root, or members of group {}",
                self.daemon_uid, group.name
            ),
            None => format!("uid {} and root", self.daemon_uid),
        };
        Err(format!(
            "uid {} may not use this memobuildd: it serves {allowed}",
            peer.uid
        ))
    }

    /// Membership is read fresh on each check so `usermod -aG` takes effect without a restart;
    /// only peers that are neither root nor the owner pay for it.
    fn is_member(&self, peer: Peer, group: &Group) -> bool {
        if peer.gid == group.gid {
            return true;
        }
        let passwd = passwd::read_database(&self.passwd_file).unwrap_or_default();
        let Some(user) = passwd::find_user_by_uid(&passwd, peer.uid) else {
            return false;
        };
        if user.gid == group.gid {
            return true;
        }
        let groups = passwd::read_database(&self.group_file).unwrap_or_default();
        passwd::find_group(&groups, &group.gid.to_string())
            .is_some_and(|current| current.members.contains(&user.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy_with_files(group: Option<Group>) -> (tempfile::TempDir, AccessPolicy) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("passwd"),
            "root:x:0:0::/root:/bin/sh\nalice:x:1001:1001::/h:/bin/sh\nbob:x:1002:1002::/h:/bin/sh\ncarol:x:1003:77::/h:/bin/sh\n",
        )
        .expect("passwd");
        std::fs::write(dir.path().join("group"), "root:x:0:\nbuilders:x:77:alice\n")
            .expect("group");
        let mut policy = AccessPolicy::new(1000, group);
        policy.passwd_file = dir.path().join("passwd");
        policy.group_file = dir.path().join("group");
        (dir, policy)
    }

    fn peer(uid: u32, gid: u32) -> Peer {
        Peer {
            uid,
            gid,
            pid: None,
        }
    }

    #[test]
    fn owner_and_root_only_without_group() {
        let (_dir, policy) = policy_with_files(None);
        assert!(policy.check(peer(1000, 1000), &[]).is_ok());
        assert!(policy.check(peer(0, 0), &[]).is_ok());
        let refusal = policy.check(peer(1001, 1001), &[]).expect_err("stranger");
        assert!(refusal.contains("uid 1001"), "{refusal}");
    }

    #[test]
    fn group_members_by_list_primary_gid_or_peer_gid() {
        let builders = Group {
            name: "builders".into(),
            gid: 77,
            members: vec![],
        };
        let (_dir, policy) = policy_with_files(Some(builders));
        assert!(policy.check(peer(1001, 1001), &[]).is_ok(), "listed member");
        assert!(policy.check(peer(1003, 1003), &[]).is_ok(), "primary group");
        assert!(
            policy.check(peer(4242, 77), &[]).is_ok(),
            "running with the gid"
        );
        assert!(
            policy.check(peer(4242, 4242), &[5, 77]).is_ok(),
            "a supplementary group of the process"
        );
        let refusal = policy
            .check(peer(1002, 1002), &[])
            .expect_err("not a member");
        assert!(refusal.contains("group builders"), "{refusal}");
    }
}
