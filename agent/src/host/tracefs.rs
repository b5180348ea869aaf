//! tracefs: making sure it is mounted, and reading tracepoint record layouts from the
//! `format` files, so probe field offsets come from the running kernel, not from today's
//! numbers.

use std::{
    ffi::CString,
    fs, io,
    path::{Path, PathBuf},
};

/// Where tracefs lives on current kernels, and where older setups expose it via debugfs.
const CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted and mounting it at /sys/kernel/tracing failed: {0}; \
         run as root, or mount it yourself: mount -t tracefs nodev /sys/kernel/tracing \
         (the kernel needs CONFIG_TRACING)"
    )]
    Mount(io::Error),
    #[error(
        "tracepoint {category}:{name} does not exist on this kernel ({path} is missing); \
         check `ls {root}/events/{category}/` and the kernel config that provides it"
    )]
    MissingTracepoint {
        category: String,
        name: String,
        path: PathBuf,
        root: PathBuf,
    },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: malformed format line {line:?}")]
    Malformed { path: PathBuf, line: String },
}

/// Returns the tracefs root, mounting tracefs at `/sys/kernel/tracing` if no tracefs is
/// reachable yet. Idempotent. The mount is left in place on exit: it is the kernel's
/// standard location and other tracing tools may be using it by then.
pub fn ensure_mounted() -> Result<PathBuf, TracefsError> {
    if let Some(root) = find_root() {
        return Ok(root);
    }
    let target = CANDIDATES[0];
    let c = |s: &str| CString::new(s).expect("no NUL in constant");
    let (source, dir, fstype) = (c("nodev"), c(target), c("tracefs"));
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            dir.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(TracefsError::Mount(io::Error::last_os_error()));
    }
    tracing::info!("mounted tracefs at {target}");
    find_root().ok_or_else(|| {
        TracefsError::Mount(io::Error::other(format!(
            "mounted, but {target}/events is not there"
        )))
    })
}

fn find_root() -> Option<PathBuf> {
    CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("events").is_dir())
}

/// One field of a tracepoint record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub offset: u32,
    pub size: u32,
}

/// The record layout of one tracepoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Format {
    pub fields: Vec<Field>,
}

impl Format {
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }
}

/// Reads `events/<category>/<name>/format` under `root`.
pub fn read_format(root: &Path, category: &str, name: &str) -> Result<Format, TracefsError> {
    let dir = root.join("events").join(category).join(name);
    let path = dir.join("format");
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(TracefsError::MissingTracepoint {
                category: category.to_owned(),
                name: name.to_owned(),
                path: dir,
                root: root.to_owned(),
            });
        }
        Err(source) => return Err(TracefsError::Read { path, source }),
    };
    parse_format(&text).map_err(|line| TracefsError::Malformed { path, line })
}

/// Parses the text of a tracefs `format` file; on error returns the offending line.
pub fn parse_format(text: &str) -> Result<Format, String> {
    let mut fields = Vec::new();
    for line in text.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut decl = None;
        let (mut offset, mut size) = (None, None);
        for part in rest.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            if let Some(v) = part.strip_prefix("offset:") {
                offset = v.parse::<u32>().ok();
            } else if let Some(v) = part.strip_prefix("size:") {
                size = v.parse::<u32>().ok();
            } else if decl.is_none() {
                decl = Some(part);
            }
        }
        let name = decl
            .and_then(|d| d.split_whitespace().last())
            // `char comm[16]` -> `comm`; `__data_loc char[] name` -> `name`
            .map(|n| n.split('[').next().unwrap_or(n).trim_start_matches('*'));
        match (name, offset, size) {
            (Some(name), Some(offset), Some(size)) if !name.is_empty() => fields.push(Field {
                name: name.to_owned(),
                offset,
                size,
            }),
            _ => return Err(line.to_owned()),
        }
    }
    Ok(Format { fields })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE_FAULT_USER: &str = "name: page_fault_user
ID: 123
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:unsigned long address;\toffset:8;\tsize:8;\tsigned:0;
\tfield:unsigned long ip;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned long error_code;\toffset:24;\tsize:8;\tsigned:0;

print fmt: \"address=%ps ip=%ps error_code=0x%lx\", (void *)REC->address
";

    #[test]
    fn parses_fields_and_offsets() {
        let f = parse_format(PAGE_FAULT_USER).unwrap();
        assert_eq!(f.fields.len(), 6);
        assert_eq!(f.field("error_code").unwrap().offset, 24);
        assert_eq!(f.field("address").unwrap().size, 8);
        assert!(f.field("nonexistent").is_none());
    }

    #[test]
    fn strips_arrays_and_pointers() {
        let f = parse_format(
            "\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\
             \tfield:void * mm;\toffset:24;\tsize:8;\tsigned:0;\n\
             \tfield:struct foo *ptr;\toffset:32;\tsize:8;\tsigned:0;\n",
        )
        .unwrap();
        assert_eq!(f.field("comm").unwrap().offset, 8);
        assert_eq!(f.field("mm").unwrap().offset, 24);
        assert_eq!(f.field("ptr").unwrap().offset, 32);
    }

    #[test]
    fn malformed_line_is_reported() {
        let err = parse_format("\tfield:int x;\toffset:abc;\tsize:4;\n").unwrap_err();
        assert!(err.contains("offset:abc"), "{err}");
    }
}
