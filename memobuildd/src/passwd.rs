//! Users and groups: the process's own ids, and lookups in `/etc/passwd`-format and
//! `/etc/group`-format text.
//!
//! The lookups read the files directly rather than through NSS because the same code must
//! answer for an image's root filesystem (USER resolution), where NSS has no say.

use std::path::Path;

pub use memobuild_protocol::paths::effective_uid;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub gid: u32,
    pub members: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: String,
}

/// Finds a group by name, or by number when `name_or_gid` is numeric.
pub fn find_group(group_file: &str, name_or_gid: &str) -> Option<Group> {
    let wanted_gid = name_or_gid.parse::<u32>().ok();
    group_file.lines().find_map(|line| {
        let group = parse_group_line(line)?;
        (group.name == name_or_gid || Some(group.gid) == wanted_gid).then_some(group)
    })
}

/// Finds a user by uid.
pub fn find_user_by_uid(passwd_file: &str, uid: u32) -> Option<User> {
    passwd_file
        .lines()
        .filter_map(parse_passwd_line)
        .find(|user| user.uid == uid)
}

/// Finds a user by name.
pub fn find_user_by_name(passwd_file: &str, name: &str) -> Option<User> {
    passwd_file
        .lines()
        .filter_map(parse_passwd_line)
        .find(|user| user.name == name)
}

/// The gids of the groups that list `user` as a member.
pub fn supplementary_gids(group_file: &str, user: &str) -> Vec<u32> {
    group_file
        .lines()
        .filter_map(parse_group_line)
        .filter(|group| group.members.iter().any(|m| m == user))
        .map(|group| group.gid)
        .collect()
}

/// Reads a system database file; a missing file reads as empty (minimal images have none).
pub fn read_database(path: &Path) -> std::io::Result<String> {
    match std::fs::read_to_string(path) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        other => other,
    }
}

fn parse_group_line(line: &str) -> Option<Group> {
    if line.starts_with('#') {
        return None;
    }
    let mut fields = line.split(':');
    let name = fields.next()?;
    let _password = fields.next()?;
    let gid = fields.next()?.trim().parse().ok()?;
    let members = fields
        .next()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(str::to_owned)
        .collect();
    Some(Group {
        name: name.to_owned(),
        gid,
        members,
    })
}

fn parse_passwd_line(line: &str) -> Option<User> {
    if line.starts_with('#') {
        return None;
    }
    let mut fields = line.split(':');
    let name = fields.next()?;
    let _password = fields.next()?;
    let uid = fields.next()?.trim().parse().ok()?;
    let gid = fields.next()?.trim().parse().ok()?;
    let _gecos = fields.next();
    let home = fields.next().unwrap_or("/").to_owned();
    Some(User {
        name: name.to_owned(),
        uid,
        gid,
        home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GROUP: &str = "root:x:0:\n# comment\ndocker:x:999:alice, bob\nbroken line\nstaff:x:50:\n";
    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n";

    #[test]
    fn finds_groups_by_name_or_number() {
        let docker = find_group(GROUP, "docker").expect("by name");
        assert_eq!(docker.gid, 999);
        assert_eq!(docker.members, ["alice", "bob"]);
        assert_eq!(find_group(GROUP, "50").expect("by gid").name, "staff");
        assert_eq!(find_group(GROUP, "nosuch"), None);
    }

    #[test]
    fn finds_users_by_uid() {
        let alice = find_user_by_uid(PASSWD, 1000).expect("alice");
        assert_eq!((alice.name.as_str(), alice.gid), ("alice", 1000));
        assert_eq!(alice.home, "/home/alice");
        assert_eq!(find_user_by_name(PASSWD, "root").expect("root").uid, 0);
        assert_eq!(supplementary_gids(GROUP, "bob"), [999]);
        assert_eq!(find_user_by_uid(PASSWD, 4242), None);
    }
}
