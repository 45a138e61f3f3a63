//! Adapter directories in PEFT's layout: `adapter_model.safetensors` plus `adapter_config.json`.
//!
//! # Reading
//!
//! Files are untrusted input. [`read_safetensors`] parses the format by hand (with `serde_json` for the header)
//! so that every defect becomes an [`Error::Format`] naming the file and saying what is wrong, instead of the
//! terse errors of the `safetensors` crate or a panic. It is exactly as strict as that crate (and therefore as the
//! Python `safetensors` package built on it) about layout: the tensors must tile the data section from byte 0 to
//! the end of the file with no gap, overlap or trailing byte, because a byte that no tensor owns is either
//! corruption or a file built to smuggle data past readers. What both accept and this reader accepts too: a
//! header whose length is not a multiple of 8, unknown extra keys in a tensor entry, and duplicate keys in the
//! header (JSON objects keep the last one, as `serde_json` and the crate do; the dropped entry's bytes are then
//! uncovered and rejected unless both entries describe the same range). Only the four floating-point dtypes of
//! [`DType`] are supported; others are an [`Error::Dtype`].
//!
//! # Writing
//!
//! Writes are atomic: readers see either the old adapter or the new one, never a mix, and an error leaves the
//! old one byte-identical. A directory is written as a fresh sibling temporary directory that is renamed into
//! place; the files of an existing adapter directory that are not ours (a README, a tokenizer, a sub-directory)
//! are hard-linked into the new directory first so that replacing the directory does not lose them. See
//! [`write_adapter`].

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::memory::copy_of;

/// The weights file of a PEFT adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The configuration file of a PEFT adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";

/// The safetensors crate's limit; headers beyond it are rejected by every reader built on it.
const MAX_HEADER_BYTES: u64 = 100_000_000;
const METADATA_KEY: &str = "__metadata__";

/// The element types adapter tensors may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F16,
    Bf16,
    F32,
    F64,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F16 | DType::Bf16 => 2,
            DType::F32 => 4,
            DType::F64 => 8,
        }
    }

    /// The name as safetensors spells it in a header.
    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "F16",
            DType::Bf16 => "BF16",
            DType::F32 => "F32",
            DType::F64 => "F64",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

const SUPPORTED_DTYPES: &str = "F16, BF16, F32, F64 (or float16, bfloat16, float32, float64)";

impl FromStr for DType {
    type Err = Error;

    /// Accepts the safetensors names in any case and numpy-style aliases.
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f16" | "float16" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::Bf16),
            "f32" | "float32" => Ok(DType::F32),
            "f64" | "float64" => Ok(DType::F64),
            _ => Err(Error::Dtype(format!("unsupported dtype {s:?}: supported are {SUPPORTED_DTYPES}"))),
        }
    }
}

/// A borrowed tensor to write: little-endian raw bytes in C order; 16-bit types as their raw bits.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

/// An owned tensor read from a file: little-endian raw bytes in C order.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Tensors with their names, as [`read_safetensors`] returns them (sorted by name).
pub type NamedTensors = Vec<(String, Tensor)>;

/// A PEFT adapter directory's contents.
#[derive(Clone, Debug)]
pub struct Adapter {
    /// Sorted by name.
    pub tensors: NamedTensors,
    /// The configuration text as stored; validated to be a JSON object.
    pub config_json: String,
}

// ------------------------------------------------------------------------------------------------------------
// Writing
// ------------------------------------------------------------------------------------------------------------

/// Writes an adapter directory `dir` with [`WEIGHTS_FILE`] and [`CONFIG_FILE`], atomically.
///
/// The weights file carries the metadata `{"format": "pt"}` that PEFT writes and that transformers' loaders
/// require. The configuration is re-serialised pretty-printed (two-space indent, keys sorted, as PEFT writes
/// it) with a trailing newline.
///
/// Protocol: a fresh temporary directory `.{name}.tmp-{pid}-{n}` is created next to `dir` (parents created as
/// needed), both files are written and fsync'd there, then the temporary directory is fsync'd.
/// - If `dir` does not exist, the temporary directory is renamed to `dir`.
/// - If it exists (it must be a directory; a symlink to one is followed), every other entry in it is hard-linked
///   into the temporary directory (subdirectories recreated, files copied where linking fails, e.g. across
///   mounts), its permissions are carried over, `dir` is renamed to `.{name}.old-{pid}-{n}`, the temporary
///   directory is renamed to `dir`, and the old one is removed.
///
/// The parent directory is fsync'd after the renames. On any error before the renames the temporary directory
/// is removed and `dir` is untouched.
///
/// POSIX cannot atomically exchange two non-empty directories, so there is a window between the two renames in
/// which `dir` does not exist. A crash inside it leaves the complete old adapter under the `.old` name and the
/// complete new one under the `.tmp` name, both next to `dir`: nothing is lost, and the only repair is a rename.
/// Concurrent writers to the same `dir` are not coordinated; the last rename wins.
///
/// # Errors
/// [`Error::Value`] for invalid tensor names, a configuration that is not a JSON object, a `dir` that exists but
/// is not a directory, or a `dir` with no final name component; [`Error::Shape`] for data whose length does not
/// match shape × dtype size; [`Error::Io`] for failures of the file system.
pub fn write_adapter(dir: &Path, tensors: &[TensorView<'_>], config_json: &str) -> Result<()> {
    let config_text = normalise_config(config_json)?;
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let weights = encode_safetensors(tensors, Some(&metadata))?;

    let dir = resolve_target(dir)?;
    let (parent, name) = split_target(&dir)?;
    fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let existing = match fs::metadata(&dir) {
        Ok(meta) if meta.is_dir() => Some(meta),
        Ok(_) => {
            return Err(Error::Value(format!(
                "{}: exists and is not a directory; an adapter is a directory holding {WEIGHTS_FILE} and \
                 {CONFIG_FILE}",
                dir.display()
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(&dir, e)),
    };

    remove_stale_temporaries(&parent, &name);
    let (tmp, n) = create_unique_dir(&parent, &name)?;
    let staged = (|| {
        write_synced(&tmp.join(WEIGHTS_FILE), &weights)?;
        write_synced(&tmp.join(CONFIG_FILE), config_text.as_bytes())?;
        if let Some(meta) = &existing {
            link_tree(&dir, &tmp, true)?;
            fs::set_permissions(&tmp, meta.permissions()).map_err(|e| Error::io(&tmp, e))?;
        }
        #[cfg(test)]
        if tests::FAIL_BEFORE_RENAME.with(|f| f.get()) {
            return Err(Error::io(&tmp, io::Error::other("injected failure")));
        }
        sync_dir(&tmp)
    })();
    if let Err(e) = staged {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }

    if existing.is_none() {
        if let Err(e) = fs::rename(&tmp, &dir) {
            let _ = fs::remove_dir_all(&tmp);
            return Err(Error::io(&dir, e));
        }
        return sync_dir(&parent);
    }

    let old = parent.join(format!(".{name}.old-{}-{n}", std::process::id()));
    if let Err(e) = fs::rename(&dir, &old) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(Error::io(&dir, e));
    }
    // The window: `dir` is absent until the next rename; see the function documentation.
    if let Err(e) = fs::rename(&tmp, &dir) {
        let restored = fs::rename(&old, &dir);
        if restored.is_ok() {
            let _ = fs::remove_dir_all(&tmp);
        }
        return Err(Error::io(&dir, e));
    }
    sync_dir(&parent)?;
    // Every foreign file of the old directory is linked or copied into the new one, so removing it loses
    // nothing. Failing to remove it is not a failed write: the new adapter is in place and durable, and the
    // leftover is an inert, clearly named directory.
    let _ = fs::remove_dir_all(&old);
    Ok(())
}

/// The configuration text [`write_adapter`] stores for `config_json`: pretty-printed, keys sorted, a trailing
/// newline. [`Error::Value`] unless `config_json` is a JSON object.
pub fn normalise_config(config_json: &str) -> Result<String> {
    let config = parse_config(config_json)?;
    let mut text = serde_json::to_string_pretty(&config)
        .map_err(|e| Error::Value(format!("adapter config cannot be serialised: {e}")))?;
    text.push('\n');
    Ok(text)
}

/// Writes one safetensors file atomically: a temporary `.{file}.tmp-{pid}-{n}` in the same directory, fsync'd,
/// renamed over `path`, and the directory fsync'd. Parent directories are created as needed.
///
/// Tensors are laid out by decreasing element size and then by name, as the `safetensors` crate does, so every
/// tensor starts at a file offset aligned to its element size (the header is padded with spaces to a multiple of
/// 8 bytes).
///
/// # Errors
/// [`Error::Value`] for empty, duplicate or reserved (`__metadata__`) names, a too-large header, or a `path` that
/// is a directory; [`Error::Shape`] for data whose length does not match shape × dtype size; [`Error::Io`] for
/// failures of the file system.
pub fn write_safetensors(
    path: &Path,
    tensors: &[TensorView<'_>],
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<()> {
    let bytes = encode_safetensors(tensors, metadata)?;
    let (parent, name) = split_target(path)?;
    if path.is_dir() {
        return Err(Error::Value(format!("{}: is a directory, expected a file path", path.display())));
    }
    fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    remove_stale_temporaries(&parent, &name);
    let mut attempt = 0;
    let (tmp, file) = loop {
        let tmp = parent.join(format!(".{name}.tmp-{}-{}", std::process::id(), next_counter()));
        match File::options().write(true).create_new(true).open(&tmp) {
            Ok(file) => break (tmp, file),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 100 => attempt += 1,
            Err(e) => return Err(Error::io(&tmp, e)),
        }
    };
    let result =
        write_and_sync(file, &tmp, &bytes).and_then(|()| fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(&parent)
}

/// Validates the tensors and serialises them to the safetensors format: the bytes [`write_safetensors`] writes.
///
/// # Errors
/// As [`write_safetensors`], less the file system's; [`Error::OutOfMemory`] when the buffer cannot be allocated.
pub fn encode_safetensors(tensors: &[TensorView<'_>], metadata: Option<&BTreeMap<String, String>>) -> Result<Vec<u8>> {
    let mut seen = HashSet::with_capacity(tensors.len());
    for t in tensors {
        if t.name.is_empty() {
            return Err(Error::Value("a tensor has an empty name: every tensor needs a non-empty name".into()));
        }
        if t.name == METADATA_KEY {
            return Err(Error::Value(format!(
                "tensor name {METADATA_KEY:?} is reserved by the safetensors format for metadata; rename the tensor"
            )));
        }
        if !seen.insert(t.name) {
            return Err(Error::Value(format!("tensor name {:?} appears twice: names must be unique", t.name)));
        }
        let expected =
            t.shape.iter().try_fold(t.dtype.size(), |acc, &d| acc.checked_mul(d)).ok_or_else(|| {
                Error::Shape(format!("tensor {:?}: shape {:?} is too large to address", t.name, t.shape))
            })?;
        if expected != t.data.len() {
            return Err(Error::Shape(format!(
                "tensor {:?}: shape {:?} of {} needs {expected} bytes but {} were given",
                t.name,
                t.shape,
                t.dtype,
                t.data.len()
            )));
        }
    }

    let mut order: Vec<&TensorView<'_>> = tensors.iter().collect();
    order.sort_by(|a, b| b.dtype.size().cmp(&a.dtype.size()).then(a.name.cmp(b.name)));

    let mut header = String::from("{");
    if let Some(meta) = metadata {
        let map: serde_json::Map<String, Value> =
            meta.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
        header.push_str(&format!("{}:{}", json_string(METADATA_KEY), Value::Object(map)));
    }
    let mut offset = 0usize;
    for (i, t) in order.iter().enumerate() {
        if i > 0 || metadata.is_some() {
            header.push(',');
        }
        let end = offset + t.data.len();
        let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
        header.push_str(&format!(
            "{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{offset},{end}]}}",
            json_string(t.name),
            t.dtype.name(),
            shape.join(",")
        ));
        offset = end;
    }
    header.push('}');
    let padded = header.len().next_multiple_of(8);
    if padded as u64 > MAX_HEADER_BYTES {
        return Err(Error::Value(format!(
            "the safetensors header would be {padded} bytes, above the format's limit of {MAX_HEADER_BYTES}; use \
             fewer tensors or shorter names and metadata"
        )));
    }
    let total = 8 + padded + offset;
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(total)
        .map_err(|_| Error::OutOfMemory(format!("cannot allocate {total} bytes for the safetensors file")))?;
    bytes.extend_from_slice(&(padded as u64).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.resize(8 + padded, b' ');
    for t in order {
        bytes.extend_from_slice(t.data);
    }
    Ok(bytes)
}

fn json_string(s: &str) -> String {
    Value::String(s.to_owned()).to_string()
}

fn parse_config(config_json: &str) -> Result<serde_json::Map<String, Value>> {
    match serde_json::from_str::<Value>(config_json) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => {
            Err(Error::Value(format!("adapter config must be a JSON object, got a JSON {}", json_kind(&other))))
        }
        Err(e) => Err(Error::Value(format!("adapter config is not valid JSON: {e}"))),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Follows a symlinked target so that the adapter is written where the link points and the link itself stays.
fn resolve_target(dir: &Path) -> Result<PathBuf> {
    match fs::symlink_metadata(dir) {
        Ok(meta) if meta.file_type().is_symlink() => fs::canonicalize(dir).map_err(|e| Error::io(dir, e)),
        _ => Ok(dir.to_path_buf()),
    }
}

/// The parent directory (`.` for a bare name) and the final component of a target path.
fn split_target(path: &Path) -> Result<(PathBuf, String)> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| {
            Error::Value(format!(
                "{}: cannot write here: the path needs a final UTF-8 name component (not `..` or `/`)",
                path.display()
            ))
        })?
        .to_owned();
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((parent, name))
}

fn next_counter() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// Creates `.{name}.tmp-{pid}-{n}` in `parent` with a fresh `n`; returns it and `n`.
fn create_unique_dir(parent: &Path, name: &str) -> Result<(PathBuf, u64)> {
    let mut attempt = 0;
    loop {
        let n = next_counter();
        let tmp = parent.join(format!(".{name}.tmp-{}-{n}", std::process::id()));
        match fs::create_dir(&tmp) {
            Ok(()) => return Ok((tmp, n)),
            // A stale directory from an earlier process with the same pid; skip past it.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 100 => attempt += 1,
            Err(e) => return Err(Error::io(&tmp, e)),
        }
    }
}

/// A temporary of a writer that this machine knows is gone is removed once it is this old (a margin against a
/// writer in another pid namespace sharing the directory, whose pid means nothing here).
const STALE_AFTER_DEAD_WRITER: Duration = Duration::from_secs(60);
/// Any temporary this old is removed: no write takes a day, so its writer was killed (on this or another host).
const STALE_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// Removes the `.{name}.tmp-{pid}-{n}` leftovers of killed writers from `parent`, so that interrupted writes do
/// not pile up. Only names of exactly that pattern are touched, never this process's own (another thread may be
/// writing), and a live writer's never: its pid must be dead and the entry a minute old, or the entry a day old.
/// Best effort: a failure here must not fail the write.
fn remove_stale_temporaries(parent: &Path, name: &str) {
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name.to_str().and_then(|f| f.strip_prefix(prefix.as_str())) else { continue };
        let Some((pid, n)) = rest.split_once('-') else { continue };
        let (Ok(pid), Ok(_)) = (pid.parse::<u32>(), n.parse::<u64>()) else { continue };
        if pid == std::process::id() {
            continue;
        }
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else { continue };
        let age = meta.modified().ok().and_then(|t| t.elapsed().ok()).unwrap_or_default();
        if age >= STALE_AFTER || (age >= STALE_AFTER_DEAD_WRITER && writer_is_gone(pid)) {
            let _ = if meta.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
        }
    }
}

/// Whether no process with this pid exists here. Only Linux's `/proc` answers without a new dependency;
/// elsewhere the answer is "unknown" and only the age rule applies.
fn writer_is_gone(pid: u32) -> bool {
    cfg!(target_os = "linux") && Path::new("/proc/self").exists() && !Path::new(&format!("/proc/{pid}")).exists()
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let file = File::options().write(true).create_new(true).open(path).map_err(|e| Error::io(path, e))?;
    write_and_sync(file, path, bytes)
}

fn write_and_sync(file: File, path: &Path, bytes: &[u8]) -> Result<()> {
    let mut writer = BufWriter::new(file);
    writer.write_all(bytes).map_err(|e| Error::io(path, e))?;
    let file = writer.into_inner().map_err(|e| Error::io(path, e.into_error()))?;
    file.sync_all().map_err(|e| Error::io(path, e))
}

/// Makes a directory's entries (new names, renames) durable. Only meaningful on Unix; elsewhere a no-op.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Recreates the tree under `src` in `dst` with hard links (copies where linking fails). At the top level our
/// own two files are skipped: the new ones are already in `dst`.
fn link_tree(src: &Path, dst: &Path, top: bool) -> Result<()> {
    for entry in fs::read_dir(src).map_err(|e| Error::io(src, e))? {
        let entry = entry.map_err(|e| Error::io(src, e))?;
        let name = entry.file_name();
        if top && (name == WEIGHTS_FILE || name == CONFIG_FILE) {
            continue;
        }
        let from = entry.path();
        let to = dst.join(&name);
        let kind = entry.file_type().map_err(|e| Error::io(&from, e))?;
        if kind.is_dir() {
            fs::create_dir(&to).map_err(|e| Error::io(&to, e))?;
            link_tree(&from, &to, false)?;
            let perms = fs::metadata(&from).map_err(|e| Error::io(&from, e))?.permissions();
            fs::set_permissions(&to, perms).map_err(|e| Error::io(&to, e))?;
        } else if let Err(link_err) = fs::hard_link(&from, &to) {
            copy_entry(&from, &to, kind).map_err(|_| Error::io(&from, link_err))?;
        }
    }
    Ok(())
}

fn copy_entry(from: &Path, to: &Path, kind: fs::FileType) -> io::Result<()> {
    #[cfg(unix)]
    if kind.is_symlink() {
        return std::os::unix::fs::symlink(fs::read_link(from)?, to);
    }
    if kind.is_file() {
        fs::copy(from, to).map(|_| ())
    } else {
        Err(io::Error::new(io::ErrorKind::Unsupported, "cannot copy a special file"))
    }
}

// ------------------------------------------------------------------------------------------------------------
// Reading
// ------------------------------------------------------------------------------------------------------------

/// Reads and validates an adapter directory.
///
/// # Errors
/// [`Error::Format`] when `dir` is missing or not a directory, when either file is missing, and for every defect
/// listed under [`read_safetensors`] or in the configuration (not UTF-8, not JSON, not a JSON object);
/// [`Error::Dtype`] for an unsupported tensor dtype; [`Error::Io`] when the operating system refuses a read.
pub fn read_adapter(dir: &Path) -> Result<Adapter> {
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(Error::format(
                dir,
                format!("not a directory; an adapter is a directory holding {WEIGHTS_FILE} and {CONFIG_FILE}"),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::format(
                dir,
                format!("no such adapter directory (it should hold {WEIGHTS_FILE} and {CONFIG_FILE})"),
            ))
        }
        Err(e) => return Err(Error::io(dir, e)),
    }
    let weights_path = dir.join(WEIGHTS_FILE);
    let config_path = dir.join(CONFIG_FILE);
    for path in [&weights_path, &config_path] {
        if !path.exists() {
            return Err(Error::format(
                path,
                format!("missing: an adapter directory needs both {WEIGHTS_FILE} and {CONFIG_FILE}"),
            ));
        }
    }

    let config_bytes = read_regular_file(&config_path)?;
    let config_json = String::from_utf8(config_bytes)
        .map_err(|e| Error::format(&config_path, format!("not valid UTF-8 text: {e}")))?;
    match serde_json::from_str::<Value>(&config_json) {
        Ok(Value::Object(_)) => {}
        Ok(other) => {
            return Err(Error::format(
                &config_path,
                format!("the adapter config must be a JSON object, found a JSON {}", json_kind(&other)),
            ))
        }
        Err(e) => return Err(Error::format(&config_path, format!("not valid JSON: {e}"))),
    }

    let (tensors, _metadata) = read_safetensors(&weights_path)?;
    Ok(Adapter { tensors, config_json })
}

/// Reads and fully validates one safetensors file; tensors are returned sorted by name, with the
/// `__metadata__` map if the file has one.
///
/// # Errors
/// [`Error::Format`] for a file shorter than 8 bytes; a header length beyond the file or above 100 MB; a header
/// that is not UTF-8, not JSON or not an object; an entry that is not an object or lacks a well-typed `dtype`,
/// `shape` or `data_offsets`; `data_offsets` that run backwards, past the end of the file, disagree with shape ×
/// dtype size, overlap, or leave bytes uncovered; `__metadata__` that is not a string-to-string map.
/// [`Error::Dtype`] for a dtype outside [`DType`]. [`Error::Io`] when the file cannot be read.
pub fn read_safetensors(path: &Path) -> Result<(NamedTensors, Option<BTreeMap<String, String>>)> {
    let bytes = read_regular_file(path)?;
    parse_safetensors(path, &bytes)
}

/// The whole content of a regular file, with the buffer sized from the opened file's own metadata.
///
/// Checking the file after opening it (not the path before) leaves no window for a swap. Opening is
/// non-blocking, so a FIFO is refused instead of waiting forever for a writer; devices (`/dev/zero` behind a
/// symlink) are refused instead of read until memory runs out. The read stops at the size the file had when
/// opened, and a file that shrank meanwhile is reported.
fn read_regular_file(path: &Path) -> Result<Vec<u8>> {
    let mut options = File::options();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::format(
            path,
            "not a regular file (a directory, FIFO, socket or device); adapter files must be regular files",
        ));
    }
    let len = meta.len();
    let size = usize::try_from(len)
        .map_err(|_| Error::OutOfMemory(format!("{}: {len} bytes do not fit in memory", path.display())))?;
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(size)
        .map_err(|_| Error::OutOfMemory(format!("{}: cannot allocate {size} bytes to read it", path.display())))?;
    file.take(len).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    if bytes.len() != size {
        return Err(Error::format(path, format!("changed size while being read ({size} bytes, then {})", bytes.len())));
    }
    Ok(bytes)
}

/// [`read_safetensors`] of bytes already in memory (errors name the file `<bytes>`).
pub fn parse_safetensors_bytes(bytes: &[u8]) -> Result<(NamedTensors, Option<BTreeMap<String, String>>)> {
    parse_safetensors(Path::new("<bytes>"), bytes)
}

struct Entry {
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    begin: usize,
    end: usize,
}

fn parse_safetensors(path: &Path, bytes: &[u8]) -> Result<(NamedTensors, Option<BTreeMap<String, String>>)> {
    let bad = |message: String| Error::format(path, message);
    let Some((len_bytes, rest)) = bytes.split_first_chunk::<8>() else {
        return Err(bad(format!(
            "{} bytes long, shorter than the 8-byte header length that starts every safetensors file (truncated \
             or not a safetensors file)",
            bytes.len()
        )));
    };
    let header_len = u64::from_le_bytes(*len_bytes);
    if header_len > MAX_HEADER_BYTES {
        return Err(bad(format!(
            "header length {header_len} is above the format's limit of {MAX_HEADER_BYTES} bytes (corrupt or not a \
             safetensors file)"
        )));
    }
    if header_len > rest.len() as u64 {
        return Err(bad(format!(
            "header length {header_len} exceeds the {} bytes after the length field (truncated file?)",
            rest.len()
        )));
    }
    // Both bounds checked above, and header_len ≤ 1e8 fits in usize.
    let (header_bytes, data) = rest.split_at(header_len as usize);
    let header = std::str::from_utf8(header_bytes).map_err(|e| bad(format!("header is not valid UTF-8: {e}")))?;
    let header: Value = serde_json::from_str(header).map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    let Value::Object(header) = header else {
        return Err(bad(format!("header must be a JSON object, found a JSON {}", json_kind(&header))));
    };

    let mut metadata = None;
    let mut entries = Vec::with_capacity(header.len());
    for (name, value) in header {
        if name == METADATA_KEY {
            metadata = Some(parse_metadata(path, value)?);
            continue;
        }
        entries.push(parse_entry(path, name, &value, data.len())?);
    }

    entries.sort_by_key(|e| (e.begin, e.end));
    let mut covered = 0usize;
    let mut previous: Option<&Entry> = None;
    for e in &entries {
        if e.begin < covered {
            let other = previous.map_or("", |p| p.name.as_str());
            return Err(bad(format!(
                "tensors {other:?} and {:?} overlap: bytes {}..{covered} of the data section belong to both",
                e.name, e.begin
            )));
        }
        if e.begin > covered {
            return Err(bad(format!(
                "bytes {covered}..{} of the data section are not covered by any tensor (corrupt file)",
                e.begin
            )));
        }
        covered = e.end;
        previous = Some(e);
    }
    if covered != data.len() {
        return Err(bad(format!(
            "bytes {covered}..{} of the data section are not covered by any tensor (trailing bytes after the last \
             tensor)",
            data.len()
        )));
    }

    let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(entries.len());
    for e in entries {
        let data = copy_of(&data[e.begin..e.end], "a tensor's data")?;
        tensors.push((e.name, Tensor { dtype: e.dtype, shape: e.shape, data }));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((tensors, metadata))
}

fn parse_metadata(path: &Path, value: Value) -> Result<BTreeMap<String, String>> {
    let Value::Object(map) = value else {
        return Err(Error::format(
            path,
            format!("{METADATA_KEY} must be a JSON object of strings, found a JSON {}", json_kind(&value)),
        ));
    };
    map.into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => Ok((k, s)),
            other => Err(Error::format(
                path,
                format!("{METADATA_KEY}[{k:?}] must be a string, found a JSON {}", json_kind(&other)),
            )),
        })
        .collect()
}

fn as_usize(v: &Value) -> Option<usize> {
    v.as_u64().and_then(|v| usize::try_from(v).ok())
}

fn parse_entry(path: &Path, name: String, value: &Value, data_len: usize) -> Result<Entry> {
    let bad = |message: String| Error::format(path, format!("tensor {name:?}: {message}"));
    let Value::Object(fields) = value else {
        return Err(bad(format!(
            "entry must be a JSON object with dtype, shape and data_offsets, found a JSON {}",
            json_kind(value)
        )));
    };
    let dtype = match fields.get("dtype") {
        Some(Value::String(s)) => match s.as_str() {
            "F16" => DType::F16,
            "BF16" => DType::Bf16,
            "F32" => DType::F32,
            "F64" => DType::F64,
            other => {
                return Err(Error::Dtype(format!(
                    "{}: tensor {name:?} has dtype {other:?}; supported are F16, BF16, F32, F64",
                    path.display()
                )))
            }
        },
        Some(other) => return Err(bad(format!("dtype must be a string, found a JSON {}", json_kind(other)))),
        None => return Err(bad("missing dtype".into())),
    };
    let shape =
        match fields.get("shape") {
            Some(Value::Array(dims)) => dims.iter().map(as_usize).collect::<Option<Vec<usize>>>().ok_or_else(|| {
                bad(format!("shape must be a list of non-negative integers, found {}", fields["shape"]))
            })?,
            Some(other) => return Err(bad(format!("shape must be a list, found a JSON {}", json_kind(other)))),
            None => return Err(bad("missing shape".into())),
        };
    let (begin, end) = match fields.get("data_offsets") {
        Some(Value::Array(pair)) => match pair.as_slice() {
            [b, e] => match (as_usize(b), as_usize(e)) {
                (Some(b), Some(e)) => (b, e),
                _ => {
                    return Err(bad(format!(
                        "data_offsets must be two non-negative integers, found {}",
                        fields["data_offsets"]
                    )))
                }
            },
            _ => {
                return Err(bad(format!(
                    "data_offsets must be a list of two integers [begin, end], found {} elements",
                    pair.len()
                )))
            }
        },
        Some(other) => return Err(bad(format!("data_offsets must be a list, found a JSON {}", json_kind(other)))),
        None => return Err(bad("missing data_offsets".into())),
    };
    if begin > end {
        return Err(bad(format!("data_offsets [{begin}, {end}] run backwards (begin after end)")));
    }
    if end > data_len {
        return Err(bad(format!(
            "data_offsets end {end} lies beyond the {data_len}-byte data section (truncated file?)"
        )));
    }
    let nbytes = shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {shape:?} of {dtype} overflows the addressable size")))?;
    if nbytes != end - begin {
        return Err(bad(format!(
            "shape {shape:?} of {dtype} needs {nbytes} bytes but data_offsets [{begin}, {end}] span {}",
            end - begin
        )));
    }
    Ok(Entry { name, dtype, shape, begin, end })
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// Makes `write_adapter` fail after staging everything, just before the renames (per test thread).
        pub(super) static FAIL_BEFORE_RENAME: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// A fresh, empty scratch directory per test.
    fn scratch(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lowrank-core-package-{}-{test}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A tiny deterministic generator so fuzz-style tests need no dependency.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            self.0 >> 33
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    struct Owned {
        name: String,
        dtype: DType,
        shape: Vec<usize>,
        data: Vec<u8>,
    }

    impl Owned {
        fn new(name: &str, dtype: DType, shape: &[usize], seed: u64) -> Self {
            let n: usize = shape.iter().product::<usize>() * dtype.size();
            Owned { name: name.into(), dtype, shape: shape.to_vec(), data: Lcg(seed).bytes(n) }
        }
        fn view(&self) -> TensorView<'_> {
            TensorView { name: &self.name, dtype: self.dtype, shape: &self.shape, data: &self.data }
        }
    }

    fn sample() -> Vec<Owned> {
        vec![
            Owned::new("scalar", DType::F64, &[], 1),
            Owned::new("vec.f16", DType::F16, &[5], 2),
            Owned::new("cube.bf16", DType::Bf16, &[2, 3, 4], 3),
            Owned::new("w.lora_A.weight", DType::F32, &[3, 7], 4),
            Owned::new("empty", DType::F32, &[0, 4], 5),
            Owned::new("x.f64", DType::F64, &[2, 2], 6),
        ]
    }

    fn views(owned: &[Owned]) -> Vec<TensorView<'_>> {
        owned.iter().map(Owned::view).collect()
    }

    fn assert_same(read: &[(String, Tensor)], written: &[Owned]) {
        let mut expected: Vec<&Owned> = written.iter().collect();
        expected.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(read.len(), expected.len());
        for ((name, t), o) in read.iter().zip(expected) {
            assert_eq!(name, &o.name);
            assert_eq!(t.dtype, o.dtype);
            assert_eq!(t.shape, o.shape);
            assert_eq!(t.data, o.data);
        }
    }

    fn encode(owned: &[Owned]) -> Vec<u8> {
        encode_safetensors(&views(owned), None).unwrap()
    }

    /// A file with a hand-written header and `data_len` data bytes.
    fn with_header(header: &str, data_len: usize) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, data_len));
        bytes
    }

    fn format_error(bytes: &[u8]) -> String {
        match parse_safetensors(Path::new("t.safetensors"), bytes) {
            Err(Error::Format { message, .. }) => message,
            other => panic!("expected a format error, got {other:?}"),
        }
    }

    #[test]
    fn dtype_names_sizes_and_parsing() {
        for (d, name, size) in
            [(DType::F16, "F16", 2), (DType::Bf16, "BF16", 2), (DType::F32, "F32", 4), (DType::F64, "F64", 8)]
        {
            assert_eq!(d.name(), name);
            assert_eq!(d.size(), size);
            assert_eq!(name.parse::<DType>().unwrap(), d);
            assert_eq!(name.to_lowercase().parse::<DType>().unwrap(), d);
        }
        assert_eq!("bfloat16".parse::<DType>().unwrap(), DType::Bf16);
        assert_eq!("float16".parse::<DType>().unwrap(), DType::F16);
        assert_eq!("float32".parse::<DType>().unwrap(), DType::F32);
        assert_eq!("Float64".parse::<DType>().unwrap(), DType::F64);
        let e = "int8".parse::<DType>().unwrap_err();
        assert!(matches!(&e, Error::Dtype(m) if m.contains("BF16") && m.contains("int8")), "{e}");
    }

    #[test]
    fn safetensors_round_trip_every_dtype_and_shape() {
        let dir = scratch("round-trip");
        let path = dir.join("nested/new/t.safetensors");
        let owned = sample();
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string()), ("k\"ey".to_string(), "v\n".to_string())]);
        write_safetensors(&path, &views(&owned), Some(&meta)).unwrap();
        let (tensors, read_meta) = read_safetensors(&path).unwrap();
        assert_same(&tensors, &owned);
        assert_eq!(read_meta, Some(meta));

        // The reference implementation accepts what we write, with the same contents.
        let bytes = fs::read(&path).unwrap();
        assert_eq!(u64::from_le_bytes(bytes[..8].try_into().unwrap()) % 8, 0);
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for o in &owned {
            let t = st.tensor(&o.name).unwrap();
            assert_eq!(t.shape(), o.shape.as_slice());
            assert_eq!(t.data(), o.data.as_slice());
            assert_eq!(t.dtype().to_string(), o.dtype.name());
        }
        // Every tensor starts at a file offset aligned to its element size.
        let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let (_, info) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        for o in &owned {
            assert_eq!((header_end + info.info(&o.name).unwrap().data_offsets.0) % o.dtype.size(), 0);
        }

        // No metadata and no tensors are both valid files.
        write_safetensors(&path, &[], None).unwrap();
        assert_eq!(read_safetensors(&path).unwrap(), (vec![], None));
        assert!(fs::read_dir(path.parent().unwrap()).unwrap().count() == 1, "temporary files left behind");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reads_what_the_safetensors_crate_writes() {
        use safetensors::tensor::{serialize, TensorView as StView};
        let a: Vec<u8> = (0..24).collect();
        let b: Vec<u8> = (0..6).collect();
        let views = vec![
            ("a", StView::new(safetensors::Dtype::F32, vec![2, 3], &a).unwrap()),
            ("b", StView::new(safetensors::Dtype::BF16, vec![3], &b).unwrap()),
        ];
        let bytes = serialize(views, None).unwrap();
        let (tensors, meta) = parse_safetensors(Path::new("x"), &bytes).unwrap();
        assert_eq!(meta, None);
        assert_eq!(tensors[0], ("a".into(), Tensor { dtype: DType::F32, shape: vec![2, 3], data: a }));
        assert_eq!(tensors[1], ("b".into(), Tensor { dtype: DType::Bf16, shape: vec![3], data: b }));
    }

    #[test]
    fn adapter_round_trip() {
        let dir = scratch("adapter-round-trip");
        let target = dir.join("out/adapter");
        let owned = sample();
        write_adapter(&target, &views(&owned), r#"{"r": 8, "peft_type": "LORA", "alpha_pattern": {"a": 2.5}}"#)
            .unwrap();
        let adapter = read_adapter(&target).unwrap();
        assert_same(&adapter.tensors, &owned);
        assert!(adapter.config_json.ends_with("}\n"));
        assert!(
            adapter.config_json.contains("\n  \"alpha_pattern\": {\n    \"a\": 2.5\n  },"),
            "{}",
            adapter.config_json
        );
        let (_, meta) = read_safetensors(&target.join(WEIGHTS_FILE)).unwrap();
        assert_eq!(meta.unwrap()["format"], "pt");
        let names: Vec<_> = fs::read_dir(dir.join("out")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec!["adapter"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn overwrite_keeps_foreign_files() {
        let dir = scratch("overwrite");
        let target = dir.join("adapter");
        write_adapter(&target, &views(&sample()), "{\"r\": 4}").unwrap();
        fs::write(target.join("README.md"), "# my adapter\n").unwrap();
        fs::create_dir_all(target.join("sub/dir")).unwrap();
        fs::write(target.join("sub/dir/file"), b"payload").unwrap();
        fs::create_dir_all(target.join("sub/emptydir")).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink("README.md", target.join("link")).unwrap();

        let new = vec![Owned::new("only", DType::F16, &[4, 4], 9)];
        write_adapter(&target, &views(&new), "{\"r\": 16}").unwrap();
        let adapter = read_adapter(&target).unwrap();
        assert_same(&adapter.tensors, &new);
        assert!(adapter.config_json.contains("16"));
        assert_eq!(fs::read_to_string(target.join("README.md")).unwrap(), "# my adapter\n");
        assert_eq!(fs::read(target.join("sub/dir/file")).unwrap(), b"payload");
        assert!(target.join("sub/emptydir").is_dir());
        #[cfg(unix)]
        assert_eq!(fs::read_link(target.join("link")).unwrap(), Path::new("README.md"));
        let names: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec!["adapter"], "temporary or old directories left behind");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn writes_through_a_symlinked_target() {
        let dir = scratch("symlink");
        fs::create_dir(dir.join("real")).unwrap();
        std::os::unix::fs::symlink("real", dir.join("alias")).unwrap();
        write_adapter(&dir.join("alias"), &views(&sample()), "{}").unwrap();
        assert!(fs::symlink_metadata(dir.join("alias")).unwrap().file_type().is_symlink());
        assert!(dir.join("real").join(WEIGHTS_FILE).is_file());
        fs::remove_dir_all(&dir).unwrap();
    }

    fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut out = BTreeMap::new();
        for entry in fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            if path.is_dir() {
                out.extend(snapshot(&path));
            } else {
                out.insert(path.clone(), fs::read(&path).unwrap());
            }
        }
        out
    }

    #[test]
    fn failed_write_leaves_the_existing_adapter_untouched() {
        let dir = scratch("failed-write");
        let target = dir.join("adapter");
        write_adapter(&target, &views(&sample()), "{\"r\": 4}").unwrap();
        fs::write(target.join("README.md"), "keep me").unwrap();
        let before = snapshot(&dir);

        let good = sample();
        let short = [0u8; 3];
        let bad_size = [TensorView { name: "t", dtype: DType::F32, shape: &[1], data: &short }];
        let huge = [TensorView { name: "t", dtype: DType::F32, shape: &[usize::MAX, 2], data: &short }];
        let dup = [good[0].view(), good[0].view()];
        let empty = [TensorView { name: "", ..good[0].view() }];
        let reserved = [TensorView { name: "__metadata__", ..good[0].view() }];
        let cases: Vec<(&[TensorView<'_>], &str)> = vec![
            (&[], "not json"),
            (&[], "[1, 2]"),
            (&[], "\"a string\""),
            (&bad_size, "{}"),
            (&huge, "{}"),
            (&dup, "{}"),
            (&empty, "{}"),
            (&reserved, "{}"),
        ];
        for (tensors, config) in cases {
            let e = write_adapter(&target, tensors, config).unwrap_err();
            assert!(matches!(e, Error::Value(_) | Error::Shape(_)), "{e:?}");
            assert_eq!(snapshot(&dir), before);
        }
        let e = write_adapter(&target, &[], "[]").unwrap_err();
        assert!(e.to_string().contains("JSON object"), "{e}");
        let e = write_adapter(&target, &views(&good), "{").unwrap_err();
        assert!(e.to_string().contains("not valid JSON"), "{e}");

        // A file where the directory should be is an error, and the file is kept.
        let file = dir.join("adapter/README.md");
        assert!(matches!(write_adapter(&file, &[], "{}"), Err(Error::Value(_))));
        assert!(matches!(write_adapter(Path::new("/"), &[], "{}"), Err(Error::Value(_))));
        assert_eq!(snapshot(&dir), before);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn failure_after_staging_leaves_no_trace() {
        let dir = scratch("failure-after-staging");
        let target = dir.join("adapter");
        write_adapter(&target, &views(&sample()), "{\"r\": 4}").unwrap();
        fs::create_dir_all(target.join("sub/dir")).unwrap();
        fs::write(target.join("sub/dir/file"), b"payload").unwrap();
        let before = snapshot(&dir);

        FAIL_BEFORE_RENAME.with(|f| f.set(true));
        let overwrite = write_adapter(&target, &[], "{}");
        let fresh = write_adapter(&dir.join("fresh"), &[], "{}");
        FAIL_BEFORE_RENAME.with(|f| f.set(false));
        assert!(matches!(overwrite, Err(Error::Io { .. })), "{overwrite:?}");
        assert!(matches!(fresh, Err(Error::Io { .. })), "{fresh:?}");
        assert_eq!(snapshot(&dir), before);
        let names: Vec<_> = fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec!["adapter"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_truncation_is_a_format_error() {
        let bytes = encode(&sample());
        for len in 0..bytes.len() {
            let message = format_error(&bytes[..len]);
            assert!(!message.is_empty());
        }
        assert!(format_error(&bytes[..5]).contains("shorter than the 8-byte"));
        assert!(format_error(&bytes[..20]).contains("exceeds"));
        assert!(format_error(&bytes[..bytes.len() - 1]).contains("beyond"));
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(format_error(&extra).contains("not covered"));
    }

    #[test]
    fn header_length_corruptions() {
        let bytes = encode(&sample());
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        let with_len = |n: u64| {
            let mut b = bytes.clone();
            b[..8].copy_from_slice(&n.to_le_bytes());
            b
        };
        assert!(format_error(&with_len(u64::MAX)).contains("limit"));
        assert!(format_error(&with_len(100_000_001)).contains("limit"));
        assert!(format_error(&with_len(bytes.len() as u64)).contains("exceeds"));
        assert!(format_error(&with_len(header_len - 9)).contains("not valid JSON"));
        // Reaching into the data section pulls arbitrary bytes into the header.
        let message = format_error(&with_len(header_len + 8));
        assert!(message.contains("not valid JSON") || message.contains("not valid UTF-8"), "{message}");
        assert!(format_error(&with_len(0)).contains("not valid JSON"));
    }

    #[test]
    fn header_content_corruptions() {
        let cases: &[(&str, usize, &str)] = &[
            ("{\"a\": ", 0, "not valid JSON"),
            ("[]", 0, "must be a JSON object"),
            ("{\"a\": 3}", 0, "entry must be a JSON object"),
            ("{\"a\": {\"shape\": [1], \"data_offsets\": [0, 4]}}", 4, "missing dtype"),
            ("{\"a\": {\"dtype\": 5, \"shape\": [1], \"data_offsets\": [0, 4]}}", 4, "dtype must be a string"),
            ("{\"a\": {\"dtype\": \"F32\", \"data_offsets\": [0, 4]}}", 4, "missing shape"),
            ("{\"a\": {\"dtype\": \"F32\", \"shape\": 1, \"data_offsets\": [0, 4]}}", 4, "shape must be a list"),
            ("{\"a\": {\"dtype\": \"F32\", \"shape\": [-1], \"data_offsets\": [0, 4]}}", 4, "non-negative"),
            ("{\"a\": {\"dtype\": \"F32\", \"shape\": [1.5], \"data_offsets\": [0, 4]}}", 4, "non-negative"),
            ("{\"a\": {\"dtype\": \"F32\", \"shape\": [1]}}", 4, "missing data_offsets"),
            ("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0]}}", 4, "two integers"),
            ("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, \"4\"]}}", 4, "non-negative"),
            ("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": {}}}", 4, "must be a list"),
            ("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 0]}}", 4, "backwards"),
            ("{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}}", 4, "beyond"),
            ("{\"a\": {\"dtype\": \"F32\", \"shape\": [3], \"data_offsets\": [0, 8]}}", 8, "needs 12 bytes"),
            (
                "{\"a\": {\"dtype\": \"F32\", \"shape\": [4294967296, 4294967296], \"data_offsets\": [0, 8]}}",
                8,
                "overflows",
            ),
            (
                "{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}, \
                 \"b\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [4, 12]}}",
                12,
                "overlap",
            ),
            (
                "{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}, \
                 \"b\": {\"dtype\": \"F32\", \"shape\": [0], \"data_offsets\": [4, 4]}}",
                8,
                "overlap",
            ),
            (
                "{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}, \
                 \"b\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [12, 20]}}",
                20,
                "bytes 8..12 of the data section are not covered",
            ),
            ("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [4, 8]}}", 8, "bytes 0..4"),
            ("{\"a\": {\"dtype\": \"F32\", \"shape\": [1], \"data_offsets\": [0, 4]}}", 8, "trailing"),
            ("{\"__metadata__\": {\"k\": 1}}", 0, "must be a string"),
            ("{\"__metadata__\": [\"k\"]}", 0, "JSON object of strings"),
        ];
        for &(header, data_len, expected) in cases {
            let message = format_error(&with_header(header, data_len));
            assert!(message.contains(expected), "{header}: {message}");
        }

        let mut not_utf8 = with_header("{\"\u{e9}\": 1}", 0);
        not_utf8[10] = 0xff;
        assert!(format_error(&not_utf8).contains("UTF-8"));

        let e = parse_safetensors(
            Path::new("t"),
            &with_header("{\"w\": {\"dtype\": \"I32\", \"shape\": [1], \"data_offsets\": [0, 4]}}", 4),
        )
        .unwrap_err();
        assert!(matches!(&e, Error::Dtype(m) if m.contains("\"w\"") && m.contains("I32") && m.contains("BF16")), "{e}");

        // Accepted like the reference reader: unpadded header, extra keys, zero-size tensors sharing an offset.
        let ok = with_header(
            "{\"a\":{\"dtype\":\"F16\",\"shape\":[0],\"data_offsets\":[0,0],\"extra\":1},\
             \"b\":{\"dtype\":\"F16\",\"shape\":[0,3],\"data_offsets\":[0,0]},\
             \"c\":{\"dtype\":\"F16\",\"shape\":[1],\"data_offsets\":[0,2]}}",
            2,
        );
        assert_eq!(parse_safetensors(Path::new("t"), &ok).unwrap().0.len(), 3);
        assert!(safetensors::SafeTensors::deserialize(&ok).is_ok());
    }

    #[test]
    fn garbage_never_panics_and_agrees_with_the_reference_reader() {
        let mut rng = Lcg(42);
        let valid = encode(&sample());
        for round in 0..600 {
            let bytes = match round % 3 {
                0 => {
                    let n = (rng.next() % 200) as usize;
                    rng.bytes(n)
                }
                1 => {
                    // A plausible length prefix followed by noise.
                    let n = (rng.next() % 200) as usize;
                    let mut b = (rng.next() % 220).to_le_bytes().to_vec();
                    b.extend(rng.bytes(n));
                    b
                }
                _ => {
                    let mut b = valid.clone();
                    for _ in 0..1 + rng.next() % 4 {
                        let i = (rng.next() as usize) % b.len();
                        b[i] = rng.next() as u8;
                    }
                    b
                }
            };
            let ours = parse_safetensors(Path::new("g"), &bytes);
            if ours.is_ok() {
                // Whatever we accept, the reference reader must accept too (so Python can read it).
                assert!(safetensors::SafeTensors::deserialize(&bytes).is_ok());
            }
        }
    }

    #[test]
    fn adapter_directory_defects() {
        let dir = scratch("adapter-defects");
        let target = dir.join("adapter");
        let is_format = |r: Result<Adapter>, needle: &str| match r {
            Err(Error::Format { message, .. }) => assert!(message.contains(needle), "{message}"),
            other => panic!("expected format error containing {needle:?}, got {other:?}"),
        };
        is_format(read_adapter(&target), "no such adapter directory");
        write_adapter(&target, &views(&sample()), "{}").unwrap();
        is_format(read_adapter(&target.join(CONFIG_FILE)), "not a directory");

        fs::write(target.join(CONFIG_FILE), b"\xff\xfe").unwrap();
        is_format(read_adapter(&target), "UTF-8");
        fs::write(target.join(CONFIG_FILE), "{\"a\": ").unwrap();
        is_format(read_adapter(&target), "not valid JSON");
        fs::write(target.join(CONFIG_FILE), "[]").unwrap();
        is_format(read_adapter(&target), "JSON object");
        fs::remove_file(target.join(CONFIG_FILE)).unwrap();
        is_format(read_adapter(&target), "needs both");

        fs::write(target.join(CONFIG_FILE), "{}").unwrap();
        let weights = fs::read(target.join(WEIGHTS_FILE)).unwrap();
        fs::write(target.join(WEIGHTS_FILE), &weights[..weights.len() / 2]).unwrap();
        is_format(read_adapter(&target), "truncated");
        fs::remove_file(target.join(WEIGHTS_FILE)).unwrap();
        is_format(read_adapter(&target), "needs both");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn single_file_write_errors() {
        let dir = scratch("single-file-errors");
        let e = write_safetensors(&dir, &[], None).unwrap_err();
        assert!(matches!(&e, Error::Value(m) if m.contains("directory")), "{e}");
        let owned = sample();
        let dup = [owned[1].view(), owned[1].view()];
        assert!(matches!(write_safetensors(&dir.join("x"), &dup, None), Err(Error::Value(_))));
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn only_regular_files_are_read() {
        let dir = scratch("special");
        let target = dir.join("adapter");
        write_adapter(&target, &views(&sample()), "{}").unwrap();
        let weights = target.join(WEIGHTS_FILE);
        fs::remove_file(&weights).unwrap();
        // A FIFO with no writer: opening it blocking would hang forever.
        let status = std::process::Command::new("mkfifo").arg(&weights).status().unwrap();
        assert!(status.success());
        let e = read_adapter(&target).unwrap_err();
        assert!(matches!(e, Error::Format { ref message, .. } if message.contains("not a regular file")), "{e}");
        fs::remove_file(&weights).unwrap();
        // A device behind a symlink: reading it would never end.
        std::os::unix::fs::symlink("/dev/zero", &weights).unwrap();
        let e = read_adapter(&target).unwrap_err();
        assert!(matches!(e, Error::Format { ref message, .. } if message.contains("not a regular file")), "{e}");
        fs::remove_file(&weights).unwrap();
        fs::remove_file(target.join(CONFIG_FILE)).unwrap();
        std::os::unix::fs::symlink("/dev/zero", target.join(CONFIG_FILE)).unwrap();
        let e = read_safetensors(&target.join(CONFIG_FILE)).unwrap_err();
        assert!(matches!(e, Error::Format { .. }), "{e}");
        let _ = fs::remove_dir_all(&dir);
    }

    fn age(path: &Path, seconds: u64) {
        let when = std::time::SystemTime::now() - Duration::from_secs(seconds);
        File::open(path).unwrap().set_modified(when).unwrap();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn stale_temporaries_of_dead_writers_are_removed() {
        let dir = scratch("stale");
        // No pid reaches 2^31 (pid_max is at most 2^22), so these writers are certainly gone.
        let dead_old = dir.join(".adapter.tmp-2147483000-3");
        let dead_fresh = dir.join(".adapter.tmp-2147483001-0");
        let live_old = dir.join(format!(".adapter.tmp-{}-7", std::process::id()));
        let parent_pid = std::os::unix::process::parent_id();
        let other_live = dir.join(format!(".adapter.tmp-{parent_pid}-1"));
        let ancient = dir.join(format!(".adapter.tmp-{parent_pid}-2"));
        let unrelated = dir.join(".other.tmp-2147483000-3");
        let file_temp = dir.join(".adapter.tmp-2147483002-1");
        for d in [&dead_old, &dead_fresh, &live_old, &other_live, &ancient, &unrelated] {
            fs::create_dir(d).unwrap();
            fs::write(d.join("partial"), b"x").unwrap();
        }
        fs::write(&file_temp, b"x").unwrap();
        for d in [&dead_old, &live_old, &other_live, &unrelated, &file_temp] {
            age(d, 120);
        }
        age(&ancient, 2 * 24 * 60 * 60);
        write_adapter(&dir.join("adapter"), &views(&sample()), "{}").unwrap();
        assert!(!dead_old.exists() && !file_temp.exists() && !ancient.exists());
        assert!(dead_fresh.exists() && live_old.exists() && other_live.exists() && unrelated.exists());
        let _ = fs::remove_dir_all(&dir);
    }
}
