//! Reading what an untrusted workload left in a folder, without following its
//! symbolic links out of that folder.
//!
//! The agent uploads a workload's checkpoints and outputs as the broker's user, so a
//! workload that writes `output/x -> /etc/shadow` (or replaces `output/` itself with a
//! link to another job's folder) must not get that file uploaded for it. Every step
//! from the root down opens the next component relative to the previous one with
//! `O_NOFOLLOW`, so a link anywhere, even one swapped in while the agent walks, makes
//! the open fail rather than leave the tree. Links are skipped, not followed.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::dir::{Dir, Type};
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{Mode, SFlag, fstatat};

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

fn open_root(root: &Path) -> io::Result<OwnedFd> {
    Ok(openat(
        nix::fcntl::AT_FDCWD,
        root,
        dir_flags(),
        Mode::empty(),
    )?)
}

/// The names of `rel`, refusing anything but plain names (no `..`, no root).
fn names(rel: &Path) -> io::Result<Vec<&OsStr>> {
    rel.components()
        .map(|c| match c {
            Component::Normal(n) => Ok(n),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a plain relative path", rel.display()),
            )),
        })
        .collect()
}

/// Opens the regular file `root/rel` for reading; fails if `root`, any folder on
/// the way or the file itself is a symbolic link, or the file is not a regular file.
pub fn open_file(root: &Path, rel: &Path) -> io::Result<File> {
    let names = names(rel)?;
    let Some((last, folders)) = names.split_last() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty path"));
    };
    let mut dir = open_root(root)?;
    for name in folders {
        dir = openat(&dir, *name, dir_flags(), Mode::empty())?;
    }
    let fd = openat(
        &dir,
        *last,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        Mode::empty(),
    )?;
    let file = File::from(fd);
    if !file.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", rel.display()),
        ));
    }
    Ok(file)
}

/// Reads `root/rel` whole, under [`open_file`]'s rules.
pub fn read(root: &Path, rel: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    open_file(root, rel)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Whether `path` is a real folder (not a link to one).
pub fn is_real_dir(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
}

/// Every regular file under `root`, as paths relative to it, sorted. Symbolic links
/// (to files or folders) are skipped; so are names starting with `.` when
/// `skip_hidden`. Fails when `root` itself is a link or not a folder.
pub fn files(root: &Path, skip_hidden: bool) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![(PathBuf::new(), open_root(root)?)];
    while let Some((rel, fd)) = stack.pop() {
        let mut dir = Dir::from_fd(fd.try_clone()?)?;
        for entry in dir.iter() {
            let entry = entry?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name == "." || name == ".." || (skip_hidden && name.as_bytes().starts_with(b".")) {
                continue;
            }
            let kind = match entry.file_type() {
                Some(t) => t,
                None => kind_at(&fd, name)?,
            };
            match kind {
                Type::Directory => {
                    let sub = openat(&fd, name, dir_flags(), Mode::empty())?;
                    stack.push((rel.join(name), sub));
                }
                Type::File => out.push(rel.join(name)),
                _ => {}
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The type of `name` in `dir` without following a link (file systems that do not
/// fill in `d_type`).
fn kind_at(dir: &OwnedFd, name: &OsStr) -> io::Result<Type> {
    let st = fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)?;
    let fmt = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
    Ok(if fmt == SFlag::S_IFDIR {
        Type::Directory
    } else if fmt == SFlag::S_IFREG {
        Type::File
    } else {
        Type::Symlink
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn links_are_neither_listed_nor_opened() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "admin token").unwrap();
        let root = dir.path().join("output");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("model.txt"), "weights").unwrap();
        std::fs::write(root.join("sub/metrics.json"), "{}").unwrap();
        std::fs::write(root.join(".hidden"), "x").unwrap();
        symlink(&secret, root.join("shadow")).unwrap();
        symlink(dir.path(), root.join("up")).unwrap();
        symlink(&secret, root.join("sub/inner")).unwrap();

        assert_eq!(
            files(&root, true).unwrap(),
            vec![
                PathBuf::from("model.txt"),
                PathBuf::from("sub/metrics.json")
            ]
        );
        assert_eq!(files(&root, false).unwrap().len(), 3);
        assert_eq!(read(&root, Path::new("model.txt")).unwrap(), b"weights");
        for bad in [
            "shadow",
            "up/secret",
            "sub/inner",
            "../secret",
            "/etc/passwd",
        ] {
            assert!(read(&root, Path::new(bad)).is_err(), "{bad} was read");
        }
    }

    #[test]
    fn a_root_that_is_a_link_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = dir.path().join("other-job/output");
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("their-model.txt"), "theirs").unwrap();
        let root = dir.path().join("output");
        symlink(&elsewhere, &root).unwrap();
        assert!(files(&root, false).is_err());
        assert!(read(&root, Path::new("their-model.txt")).is_err());
        assert!(!is_real_dir(&root));
    }
}
