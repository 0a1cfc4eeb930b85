//! The corpus `luamilter replay` reads, one message at a time: a directory of `.eml` files
//! (searched recursively), a Maildir (`cur/` and `new/`), an mbox file, or one message file.
//!
//! Reading is lazy: the iterator holds the sorted names of one directory (or one message of an
//! mbox) at a time, never the corpus, so memory does not grow with it. Messages come in a fixed
//! order (names sorted byte-wise, a directory's files before its subdirectories; an mbox in file
//! order), so "the first examples" are the same on every run.

use std::{
    collections::VecDeque,
    fs::File,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
};

/// One message of the corpus, read or not.
#[derive(Debug)]
pub struct Item {
    /// Its place in the corpus order, from 0.
    pub index: usize,
    /// How reports name it: the file, relative to the corpus; `FILE:LINE` in an mbox.
    pub name: String,
    /// Its bytes, or why they could not be read.
    pub bytes: Result<Vec<u8>, String>,
    /// Where its sidecar envelope file would be (it may not exist).
    pub sidecar: Option<PathBuf>,
}

/// What kind of corpus a path is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A directory of `*.eml` files, searched recursively.
    Directory,
    /// A Maildir: every file of `cur/` and `new/`.
    Maildir,
    /// An mbox file: messages start at `From ` lines.
    Mbox,
    /// One message file.
    Message,
}

/// A corpus, not yet read.
#[derive(Clone, Debug)]
pub struct Corpus {
    pub path: PathBuf,
    pub kind: Kind,
}

impl Corpus {
    /// Finds what `path` is.
    pub fn open(path: &Path) -> Result<Corpus, String> {
        let meta =
            std::fs::metadata(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        let kind = if meta.is_dir() {
            if path.join("cur").is_dir() && path.join("new").is_dir() {
                Kind::Maildir
            } else {
                Kind::Directory
            }
        } else {
            let mut first = Vec::new();
            let file =
                File::open(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
            BufReader::new(file)
                .read_until(b'\n', &mut first)
                .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
            if first.starts_with(b"From ") {
                Kind::Mbox
            } else {
                Kind::Message
            }
        };
        Ok(Corpus {
            path: path.to_path_buf(),
            kind,
        })
    }

    /// "a directory of .eml files", …
    pub fn describe(&self) -> &'static str {
        match self.kind {
            Kind::Directory => "a directory of .eml files",
            Kind::Maildir => "a Maildir",
            Kind::Mbox => "an mbox",
            Kind::Message => "one message file",
        }
    }

    /// The messages, one at a time.
    pub fn items(self) -> Box<dyn Iterator<Item = Item> + Send> {
        let numbered = |iter: Box<dyn Iterator<Item = Item> + Send>| {
            Box::new(iter.enumerate().map(|(index, mut item)| {
                item.index = index;
                item
            })) as Box<dyn Iterator<Item = Item> + Send>
        };
        match self.kind {
            Kind::Directory => numbered(Box::new(Walk::new(
                &self.path,
                vec![self.path.clone()],
                true,
                |name| name.to_ascii_lowercase().ends_with(".eml"),
            ))),
            Kind::Maildir => numbered(Box::new(Walk::new(
                &self.path,
                vec![self.path.join("cur"), self.path.join("new")],
                false,
                |name| !name.starts_with('.') && !name.ends_with(".env"),
            ))),
            Kind::Mbox => numbered(Box::new(Mbox::new(&self.path))),
            Kind::Message => {
                let item = Item {
                    index: 0,
                    name: self.path.display().to_string(),
                    bytes: read(&self.path),
                    sidecar: Some(sidecar(&self.path)),
                };
                Box::new(std::iter::once(item))
            }
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read: {e}"))
}

/// The sidecar of a message file: `NAME.env` beside `NAME.eml`, else the file name with `.env`
/// after it (Maildir names).
pub fn sidecar(path: &Path) -> PathBuf {
    let is_eml = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("eml"));
    if is_eml {
        path.with_extension("env")
    } else {
        let mut name = path.as_os_str().to_owned();
        name.push(".env");
        PathBuf::from(name)
    }
}

/// A lazy walk over directories: the sorted files of one directory at a time.
struct Walk {
    root: PathBuf,
    /// Directories still to list, the next last.
    dirs: Vec<PathBuf>,
    /// Files of the directory being read, and errors met listing it.
    files: VecDeque<Result<PathBuf, (PathBuf, String)>>,
    recursive: bool,
    wanted: fn(&str) -> bool,
}

impl Walk {
    fn new(root: &Path, mut dirs: Vec<PathBuf>, recursive: bool, wanted: fn(&str) -> bool) -> Walk {
        dirs.reverse();
        Walk {
            root: root.to_path_buf(),
            dirs,
            files: VecDeque::new(),
            recursive,
            wanted,
        }
    }

    /// Lists the next directory: its wanted files into `files`, its subdirectories onto `dirs`.
    fn list(&mut self, dir: PathBuf) {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) => {
                self.files
                    .push_back(Err((dir, format!("cannot list the directory: {e}"))));
                return;
            }
        };
        let mut files = Vec::new();
        let mut subdirs = Vec::new();
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    self.files.push_back(Err((
                        dir.clone(),
                        format!("cannot list the directory: {e}"),
                    )));
                    continue;
                }
            };
            let path = entry.path();
            // Follows symbolic links, as an admin's corpus may be made of them.
            if path.is_dir() {
                if self.recursive {
                    subdirs.push(path);
                }
            } else if (self.wanted)(&entry.file_name().to_string_lossy()) {
                files.push(path);
            }
        }
        files.sort();
        subdirs.sort();
        self.files.extend(files.into_iter().map(Ok));
        self.dirs.extend(subdirs.into_iter().rev());
    }
}

impl Iterator for Walk {
    type Item = Item;

    fn next(&mut self) -> Option<Item> {
        loop {
            if let Some(next) = self.files.pop_front() {
                let (path, bytes) = match next {
                    Ok(path) => {
                        let bytes = read(&path);
                        (path, bytes)
                    }
                    Err((dir, e)) => (dir, Err(e)),
                };
                let name = path
                    .strip_prefix(&self.root)
                    .unwrap_or(&path)
                    .display()
                    .to_string();
                return Some(Item {
                    index: 0,
                    name,
                    bytes,
                    sidecar: Some(sidecar(&path)),
                });
            }
            let dir = self.dirs.pop()?;
            self.list(dir);
        }
    }
}

/// The messages of an mbox: each starts at a `From ` line (at the start of the file or after an
/// empty line), which is not part of it; `>From ` lines lose one `>` (mboxrd quoting).
struct Mbox {
    name: String,
    reader: Option<BufReader<File>>,
    /// Lines read so far.
    line: usize,
    /// The line number of the next message's `From ` line.
    start: usize,
    failed: Option<String>,
}

impl Mbox {
    fn new(path: &Path) -> Mbox {
        let (reader, failed) = match File::open(path) {
            Ok(f) => (Some(BufReader::new(f)), None),
            Err(e) => (None, Some(format!("cannot read: {e}"))),
        };
        Mbox {
            name: path.display().to_string(),
            reader,
            line: 0,
            start: 1,
            failed,
        }
    }
}

impl Iterator for Mbox {
    type Item = Item;

    fn next(&mut self) -> Option<Item> {
        if let Some(e) = self.failed.take() {
            self.reader = None;
            return Some(Item {
                index: 0,
                name: format!("{}:{}", self.name, self.start),
                bytes: Err(e),
                sidecar: None,
            });
        }
        let reader = self.reader.as_mut()?;
        let start = self.start;
        let mut message = Vec::new();
        let mut line = Vec::new();
        let mut previous_empty = true;
        // The From line of this message was read with the previous one (or is the next line).
        let mut seen_from = self.line > 0;
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) => {
                    self.reader = None;
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    self.reader = None;
                    return Some(Item {
                        index: 0,
                        name: format!("{}:{start}", self.name),
                        bytes: Err(format!("cannot read: {e}")),
                        sidecar: None,
                    });
                }
            }
            self.line += 1;
            if line.starts_with(b"From ") && previous_empty {
                if seen_from {
                    self.start = self.line;
                    break;
                }
                seen_from = true;
                continue;
            }
            let content = line.strip_suffix(b"\n").unwrap_or(&line);
            let content = content.strip_suffix(b"\r").unwrap_or(content);
            previous_empty = content.is_empty();
            let unquoted = line.starts_with(b">")
                && line.iter().skip_while(|b| **b == b'>').take(5).eq(b"From ");
            message.extend_from_slice(if unquoted { &line[1..] } else { &line });
        }
        // The empty line before the next From line separates; it is not the message's.
        if self.reader.is_some() {
            if message.ends_with(b"\r\n\r\n") {
                message.truncate(message.len() - 2);
            } else if message.ends_with(b"\n\n") {
                message.truncate(message.len() - 1);
            }
        }
        Some(Item {
            index: 0,
            name: format!("{}:{start}", self.name),
            bytes: Ok(message),
            sidecar: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_mbox_splits_at_from_lines_and_unquotes() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("box");
        std::fs::write(
            &path,
            "From a@example.com Mon Jan  1 00:00:00 2024\nSubject: one\n\n>From the start\nbody\n\n\
             From b@example.com Mon Jan  1 00:00:01 2024\nSubject: two\n\nbody\nFrom here (not a separator)\n",
        )
        .unwrap();
        let corpus = Corpus::open(&path).unwrap();
        assert_eq!(corpus.kind, Kind::Mbox);
        let items: Vec<Item> = corpus.items().collect();
        assert_eq!(items.len(), 2);
        assert_eq!(
            items[0].bytes.as_deref().unwrap(),
            b"Subject: one\n\nFrom the start\nbody\n"
        );
        assert_eq!(items[1].index, 1);
        assert!(items[1].name.ends_with(":7"), "{}", items[1].name);
        assert_eq!(
            items[1].bytes.as_deref().unwrap(),
            b"Subject: two\n\nbody\nFrom here (not a separator)\n"
        );
    }

    #[test]
    fn sidecars_sit_beside_their_message() {
        assert_eq!(sidecar(Path::new("d/a.eml")), Path::new("d/a.env"));
        assert_eq!(
            sidecar(Path::new("cur/1700.x:2,S")),
            Path::new("cur/1700.x:2,S.env")
        );
    }
}
