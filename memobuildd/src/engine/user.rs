//! `USER name[:group]` (or numbers) resolved the way Docker does, against the image's own
//! /etc/passwd and /etc/group — never the host's.

use std::path::Path;

use super::view::RootView;
use crate::exec::ProcessUser;
use crate::passwd;

/// A resolved user: ids for the process, home for `$HOME`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub process: ProcessUser,
    pub home: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("unable to find user {0}: no matching entries in the image's /etc/passwd")]
    UnknownUser(String),
    #[error("unable to find group {0}: no matching entries in the image's /etc/group")]
    UnknownGroup(String),
}

/// Resolves `spec` (`""` means root) in `view`.
pub fn resolve(spec: &str, view: &RootView) -> Result<ResolvedUser, UserError> {
    let read = |path: &str| {
        view.read(Path::new(path))
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    };
    resolve_in(spec, &read("/etc/passwd"), &read("/etc/group"))
}

/// The owner `--chown=spec` gives (COPY, ADD), by BuildKit's rule, which differs from USER's
/// for a bare uid: `2000` means 2000:2000 whatever /etc/passwd says, while a name takes the
/// user's primary group. An explicit group, by name or number, always wins.
pub fn chown(spec: &str, view: &RootView) -> Result<(u32, u32), UserError> {
    let read = |path: &str| {
        view.read(Path::new(path))
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    };
    chown_in(spec, &read("/etc/passwd"), &read("/etc/group"))
}

fn chown_in(spec: &str, passwd_db: &str, group_db: &str) -> Result<(u32, u32), UserError> {
    let (user_part, group_part) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    let (uid, primary) = match user_part.parse::<u32>() {
        Ok(uid) => (uid, uid),
        Err(_) => {
            let user = passwd::find_user_by_name(passwd_db, user_part)
                .ok_or_else(|| UserError::UnknownUser(user_part.to_owned()))?;
            (user.uid, user.gid)
        }
    };
    let gid = match group_part {
        None | Some("") => primary,
        Some(group) => match group.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => {
                passwd::find_group(group_db, group)
                    .ok_or_else(|| UserError::UnknownGroup(group.to_owned()))?
                    .gid
            }
        },
    };
    Ok((uid, gid))
}

fn resolve_in(spec: &str, passwd_db: &str, group_db: &str) -> Result<ResolvedUser, UserError> {
    let (user_part, group_part) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    let user_part = if user_part.is_empty() { "0" } else { user_part };
    let entry = match user_part.parse::<u32>() {
        Ok(uid) => passwd::find_user_by_uid(passwd_db, uid).or(Some(passwd::User {
            name: String::new(),
            uid,
            gid: 0,
            home: "/".into(),
        })),
        Err(_) => passwd::find_user_by_name(passwd_db, user_part),
    }
    .ok_or_else(|| UserError::UnknownUser(user_part.to_owned()))?;
    let (gid, additional_gids) = match group_part {
        Some(group) => {
            let gid = match group.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => {
                    passwd::find_group(group_db, group)
                        .ok_or_else(|| UserError::UnknownGroup(group.to_owned()))?
                        .gid
                }
            };
            // An explicit group replaces the user's groups entirely, as in Docker.
            (gid, Vec::new())
        }
        None => {
            let mut extra = passwd::supplementary_gids(group_db, &entry.name);
            extra.retain(|g| *g != entry.gid);
            (entry.gid, extra)
        }
    };
    Ok(ResolvedUser {
        process: ProcessUser {
            uid: entry.uid,
            gid,
            additional_gids,
        },
        home: entry.home,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\ndocker:x:999:app\nstaff:x:50:\n";

    fn ids(spec: &str) -> (u32, u32, Vec<u32>) {
        let user = resolve_in(spec, PASSWD, GROUP).expect("resolves");
        (
            user.process.uid,
            user.process.gid,
            user.process.additional_gids,
        )
    }

    #[test]
    fn chown_takes_a_bare_uid_as_its_own_group() {
        let ids = |spec| chown_in(spec, PASSWD, GROUP).expect("resolves");
        assert_eq!(ids("2000"), (2000, 2000));
        // A known uid still gets its own number as group, not its passwd group.
        const ODD: &str = "odd:x:1500:50::/:/bin/sh\n";
        assert_eq!(chown_in("1500", ODD, GROUP), Ok((1500, 1500)));
        assert_eq!(chown_in("odd", ODD, GROUP), Ok((1500, 50)));
        assert_eq!(ids("app"), (1000, 1000));
        assert_eq!(ids("app:staff"), (1000, 50));
        assert_eq!(ids("2000:3000"), (2000, 3000));
        assert_eq!(ids("root:docker"), (0, 999));
        assert_eq!(
            chown_in("ghost", PASSWD, GROUP),
            Err(UserError::UnknownUser("ghost".into()))
        );
    }

    #[test]
    fn docker_user_rules() {
        assert_eq!(ids(""), (0, 0, vec![]));
        assert_eq!(ids("app"), (1000, 1000, vec![999]));
        assert_eq!(ids("app:staff"), (1000, 50, vec![]));
        assert_eq!(ids("1000"), (1000, 1000, vec![999]));
        assert_eq!(ids("4242"), (4242, 0, vec![]), "unknown uids are allowed");
        assert_eq!(ids("4242:4243"), (4242, 4243, vec![]));
        assert_eq!(
            resolve_in("app", PASSWD, GROUP).expect("app").home,
            "/home/app"
        );
        assert_eq!(
            resolve_in("nobody", PASSWD, GROUP),
            Err(UserError::UnknownUser("nobody".into()))
        );
        assert_eq!(
            resolve_in("app:wheel", PASSWD, GROUP),
            Err(UserError::UnknownGroup("wheel".into()))
        );
    }
}
