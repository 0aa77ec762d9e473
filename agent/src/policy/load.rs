//! The policy loader: a directory of YAML segment files → the validated [`Policy`] (SPEC §1).
//!
//! The YAML tree is walked by hand (no serde) so that every problem is reported at the
//! `file:line:col` of the offending node, and so that one run reports every problem it can
//! find instead of stopping at the first one.
//!
//! Loading takes two passes. The first parses each file on its own and checks the shape,
//! types and values of every document. The second registers the names of all documents and
//! then resolves every `to:`, `from:` and `exempt` entry, since a name may be defined in any
//! file. Only a policy without errors is returned.

use std::{
    collections::{btree_map::Entry, hash_map, BTreeMap, HashMap, HashSet},
    fmt, fs, io,
    net::IpAddr,
    ops::RangeInclusive,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use ipnet::IpNet;
use saphyr::{LoadableYamlNode, MarkedYaml, Marker, Scalar, YamlData};

use super::{
    diagnostic::{display_lines, Diagnostic, Diagnostics},
    model::{
        AcceptRule, AllowRule, DeniedFlowsTrigger, Device, FanoutTrigger, Location, MacAddr, Mode,
        Policy, PortSpec, Protocol, Quarantine, Segment, Source, Target, Triggers, Zone,
    },
};

#[derive(thiserror::Error, Debug)]
pub enum LoadError {
    /// The policy directory, one of its subdirectories or one of its files cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The files were read but the policy is not valid; sorted by file, line and column.
    #[error("{}", display_lines(.0))]
    Invalid(Vec<Diagnostic>),
}

impl LoadError {
    /// The problems found in the policy (empty for I/O errors).
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            LoadError::Io { .. } => &[],
            LoadError::Invalid(diagnostics) => diagnostics,
        }
    }
}

/// Loads every `*.yaml` / `*.yml` file under `dir` (recursively, in sorted order).
///
/// Diagnostics name files as `dir` joined with their path below it, so that `check segments/`
/// prints `segments/sensors.yaml:14:9: …`. Hidden entries (names starting with `.`) are skipped:
/// they are editor, VCS or Kubernetes ConfigMap bookkeeping (`.git`, `..data`), not policy.
pub fn load_dir(dir: &Path) -> Result<Policy, LoadError> {
    let files = policy_files(dir)?
        .into_iter()
        .map(|path| match fs::read(&path) {
            Ok(bytes) => Ok((path, bytes)),
            Err(source) => Err(LoadError::Io { path, source }),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut loader = Loader::default();
    loader.add_files(files);
    loader.finish()
}

/// The segment files that [`load_dir`] reads, in the order it reads them (e.g. for a watcher).
pub fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let mut relative = Vec::new();
    let mut visited = HashSet::new();
    collect_files(dir, Path::new(""), &mut relative, &mut visited)?;
    relative.sort();
    Ok(relative.into_iter().map(|rel| dir.join(rel)).collect())
}

/// Loads a policy made of the single file `file` whose contents are `text`.
pub fn load_str(file: &Path, text: &str) -> Result<Policy, LoadError> {
    load_sources([(file, text)])
}

/// Loads a policy made of in-memory files, in the given order (as if read from a directory).
pub fn load_sources<'a>(
    sources: impl IntoIterator<Item = (&'a Path, &'a str)>,
) -> Result<Policy, LoadError> {
    let mut loader = Loader::default();
    for (file, text) in sources {
        loader.add_file(file.to_path_buf(), text.as_bytes());
    }
    loader.finish()
}

fn collect_files(
    root: &Path,
    relative: &Path,
    out: &mut Vec<PathBuf>,
    visited: &mut HashSet<PathBuf>,
) -> Result<(), LoadError> {
    // `join("")` would add a trailing slash to the names in error messages.
    let dir = if relative.as_os_str().is_empty() {
        root.to_path_buf()
    } else {
        root.join(relative)
    };
    let io_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LoadError::Io { path, source }
    };
    // Symlinked directories are followed (GitOps checkouts and ConfigMaps use them), so guard
    // against cycles by remembering where we have been.
    let canonical = fs::canonicalize(&dir).map_err(io_error(&dir))?;
    if !visited.insert(canonical) {
        return Ok(());
    }
    for entry in fs::read_dir(&dir).map_err(io_error(&dir))? {
        let entry = entry.map_err(io_error(&dir))?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let rel = relative.join(&name);
        let path = root.join(&rel);
        let metadata = match fs::metadata(&path) {
            Ok(metadata) => metadata,
            // A dangling link that would be a segment file is an error; anything else is not
            // ours to judge.
            Err(source) if is_yaml(&rel) => return Err(LoadError::Io { path, source }),
            Err(_) => continue,
        };
        if metadata.is_dir() {
            collect_files(root, &rel, out, visited)?;
        } else if is_yaml(&rel) {
            out.push(rel);
        }
    }
    Ok(())
}

fn is_yaml(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    )
}

// ---------------------------------------------------------------------------------------------
// Raw documents: what one file says, checked on its own, before names are resolved.

/// A name or reference as written, with where it was written.
#[derive(Clone, Debug)]
struct Named {
    name: String,
    location: Location,
}

#[derive(Debug)]
enum RawDoc {
    Segment(RawSegment),
    Zone(RawZone),
    Quarantine(RawQuarantine),
}

/// Fields that could not be read are `None` / left out; their errors are already reported.
#[derive(Debug)]
struct RawSegment {
    name: Option<Named>,
    description: Option<String>,
    mode: Mode,
    devices: Vec<RawDevice>,
    allow: Vec<RawRule>,
    accept: Vec<RawRule>,
    location: Location,
}

#[derive(Debug)]
struct RawDevice {
    id: Option<Named>,
    mac: Option<MacAddr>,
    addresses: Vec<(IpAddr, Location)>,
    location: Location,
}

impl RawDevice {
    /// The device as error messages name it.
    fn label(&self) -> String {
        match &self.id {
            Some(id) => format!("device {:?}", id.name),
            None => format!("the device at {}", self.location),
        }
    }
}

#[derive(Debug)]
struct RawZone {
    name: Option<Named>,
    cidrs: Vec<IpNet>,
    location: Location,
}

/// An `allow` (`to:`) or `accept` (`from:`) rule whose target is not resolved yet.
#[derive(Debug)]
struct RawRule {
    target: Named,
    ports: Vec<PortSpec>,
    location: Location,
}

#[derive(Debug)]
struct RawQuarantine {
    allow: Vec<RawRule>,
    triggers: Triggers,
    exempt: Vec<Named>,
    location: Location,
}

// ---------------------------------------------------------------------------------------------
// First pass: files.

/// The longest run of indentation and block indicators (` `, `-`, `?`, `:`) that may begin a
/// line. saphyr's parser recurses once per nesting level and a stack overflow aborts the whole
/// process, so absurdly deep files must be refused before parsing (see [`too_deep_line`]).
const MAX_LINE_LEAD: usize = 200;

/// Stack for the parser thread: far more than the deepest nesting [`MAX_LINE_LEAD`] allows
/// (about 700 levels at roughly 2 KiB each in debug builds), and the usual main-thread size.
const PARSER_STACK_SIZE: usize = 8 << 20;

#[derive(Default)]
struct Loader {
    docs: Vec<RawDoc>,
    diags: Diagnostics,
}

impl Loader {
    fn add_file(&mut self, path: PathBuf, bytes: &[u8]) {
        let file = Arc::new(path);
        let text = match std::str::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => {
                let (line, column) = end_position(&bytes[..e.valid_up_to()]);
                self.diags.error(
                    Location { file, line, column },
                    "this file is not UTF-8 text (segment files must be UTF-8 encoded)",
                );
                return;
            }
        };
        let (docs, diags) = parse_file(&file, text);
        self.docs.extend(docs);
        self.diags.extend(diags);
    }

    /// Adds `files` in order, parsed on one thread per core: files are independent until
    /// [`Loader::finish`], and a policy of 100k devices takes a second to parse on one.
    fn add_files(&mut self, files: Vec<(PathBuf, Vec<u8>)>) {
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, files.len().max(1));
        let mut parsed: Vec<(usize, Loader)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|worker| {
                    let files = &files;
                    scope.spawn(move || {
                        files
                            .iter()
                            .enumerate()
                            .skip(worker)
                            .step_by(workers)
                            .map(|(i, (path, bytes))| {
                                let mut one = Loader::default();
                                one.add_file(path.clone(), bytes);
                                (i, one)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| {
                    h.join()
                        .expect("a parser worker panicked outside the parser")
                })
                .collect()
        });
        parsed.sort_by_key(|(i, _)| *i);
        for (_, one) in parsed {
            self.docs.extend(one.docs);
            self.diags.extend(one.diags);
        }
    }

    fn finish(self) -> Result<Policy, LoadError> {
        let mut diags = self.diags;
        let policy = assemble(self.docs, &mut diags);
        if diags.has_errors() {
            diags.sort();
            return Err(LoadError::Invalid(diags.into_vec()));
        }
        Ok(policy)
    }
}

/// 1-based line and column just after `valid` (a UTF-8 prefix of the file).
fn end_position(valid: &[u8]) -> (usize, usize) {
    let text = std::str::from_utf8(valid).unwrap_or_default();
    let line = text.matches('\n').count() + 1;
    let column = text.rsplit('\n').next().unwrap_or_default().chars().count() + 1;
    (line, column)
}

/// Parses one file and checks its documents. Runs the parser on a thread of its own with a
/// known stack size (callers may be on small tokio worker stacks), which also confines any
/// panic inside saphyr to this file.
fn parse_file(file: &Arc<PathBuf>, text: &str) -> (Vec<RawDoc>, Diagnostics) {
    if let Some(line) = too_deep_line(text) {
        let mut diags = Diagnostics::new();
        diags.error(
            Location {
                file: file.clone(),
                line,
                column: 1,
            },
            format!(
                "this line is indented or nested too deeply (more than {MAX_LINE_LEAD} columns)"
            ),
        );
        return (Vec::new(), diags);
    }
    let outcome = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("policy-parser".into())
            .stack_size(PARSER_STACK_SIZE)
            .spawn_scoped(scope, || Walker::new(file, text).walk())
            .map(std::thread::ScopedJoinHandle::join)
    });
    let problem = match outcome {
        Ok(Ok(result)) => return result,
        Ok(Err(_panic)) => {
            "the YAML parser crashed on this file; please report this as a bug".into()
        }
        Err(e) => format!("cannot start the YAML parser: {e}"),
    };
    let mut diags = Diagnostics::new();
    diags.error(
        Location {
            file: file.clone(),
            line: 1,
            column: 1,
        },
        problem,
    );
    (Vec::new(), diags)
}

/// The first line (1-based) that begins with more than [`MAX_LINE_LEAD`] characters of
/// indentation and block indicators, if any.
///
/// Why this bounds nesting: a nested block collection is indented further than its parent
/// (a list under a mapping key may share its column, once), and it starts either at a line's
/// first non-blank character or right after `- `, `? ` or `: ` on the same line. So block
/// nesting is at most about twice the longest such lead, and flow nesting (`[`, `{`) is capped
/// at 255 levels by saphyr itself. A lone `\r` also breaks lines for saphyr, so pieces between
/// `\r`s are checked as lines of their own.
fn too_deep_line(text: &str) -> Option<usize> {
    let lead_char = |c: char| matches!(c, ' ' | '\t' | '-' | '?' | ':' | '\u{feff}');
    let too_long = |piece: &str| {
        piece
            .chars()
            .take_while(|&c| lead_char(c))
            .nth(MAX_LINE_LEAD)
            .is_some()
    };
    text.split('\n')
        .position(|line| line.split('\r').any(too_long))
        .map(|i| i + 1)
}

type Node<'i> = MarkedYaml<'i>;

/// Checks the documents of one file.
struct Walker<'f> {
    file: &'f Arc<PathBuf>,
    text: &'f str,
    docs: Vec<RawDoc>,
    diags: Diagnostics,
}

/// The keys of one mapping, checked against the keys its kind of mapping may have.
struct Fields<'n, 'i> {
    node: &'n Node<'i>,
    what: &'static str,
    entries: Vec<(&'static str, &'n Node<'i>, &'n Node<'i>)>,
}

impl<'n, 'i> Fields<'n, 'i> {
    /// An optional key; an explicit null (`key:` with nothing after it) counts as absent.
    fn get(&self, key: &str) -> Option<&'n Node<'i>> {
        self.entries
            .iter()
            .find(|(k, _, _)| *k == key)
            .map(|&(_, _, value)| value)
            .filter(|value| !is_null(value))
    }
}

pub(crate) fn is_null(node: &Node) -> bool {
    matches!(node.data, YamlData::Value(Scalar::Null))
}

/// What a node is, in words an operator understands (also for `segward.yaml`).
pub(crate) fn describe(node: &Node) -> &'static str {
    match &node.data {
        YamlData::Value(Scalar::Null) => "nothing",
        YamlData::Value(Scalar::Boolean(_)) => "true/false",
        YamlData::Value(Scalar::Integer(_) | Scalar::FloatingPoint(_)) => "a number",
        YamlData::Value(Scalar::String(_)) | YamlData::Representation(..) => "a string",
        YamlData::Sequence(_) => "a list",
        YamlData::Mapping(_) => "a mapping",
        YamlData::Tagged(..) => "a tagged value (YAML tags are not supported)",
        YamlData::Alias(_) | YamlData::BadValue => "an invalid value",
    }
}

pub(crate) const SEGMENT_KEYS: &[&str] = &[
    "kind",
    "name",
    "description",
    "mode",
    "devices",
    "allow",
    "accept",
];
pub(crate) const ZONE_KEYS: &[&str] = &["kind", "name", "cidrs"];
pub(crate) const QUARANTINE_KEYS: &[&str] = &["kind", "allow", "triggers", "exempt"];
pub(crate) const DEVICE_KEYS: &[&str] = &["id", "mac", "addresses"];
pub(crate) const ALLOW_KEYS: &[&str] = &["to", "ports"];
pub(crate) const ACCEPT_KEYS: &[&str] = &["from", "ports"];
pub(crate) const TRIGGERS_KEYS: &[&str] = &["denied_flows", "fanout"];
pub(crate) const DENIED_FLOWS_KEYS: &[&str] = &["count", "window"];
pub(crate) const FANOUT_KEYS: &[&str] = &["destinations", "window"];
pub(crate) const KINDS: &[&str] = &["Segment", "Zone", "Quarantine"];

const PORTS_HINT: &str =
    " (nothing is allowed implicitly: list ports such as \"443/tcp\", or \"any\")";

impl<'f> Walker<'f> {
    fn new(file: &'f Arc<PathBuf>, text: &'f str) -> Self {
        Walker {
            file,
            text,
            docs: Vec::new(),
            diags: Diagnostics::new(),
        }
    }

    fn walk(mut self) -> (Vec<RawDoc>, Diagnostics) {
        match MarkedYaml::load_from_str(self.text) {
            Ok(docs) => {
                for doc in &docs {
                    self.document(doc);
                }
            }
            Err(e) => {
                let mut message = format!("invalid YAML: {}", e.info());
                if e.info().contains("tab") {
                    message.push_str(" (indent with spaces, not tabs)");
                }
                let location = self.marker(*e.marker());
                self.diags.error(location, message);
            }
        }
        (self.docs, self.diags)
    }

    fn marker(&self, marker: Marker) -> Location {
        Location {
            file: self.file.clone(),
            // saphyr's lines are 1-based and its columns 0-based.
            line: marker.line().max(1),
            column: marker.col() + 1,
        }
    }

    fn at(&self, node: &Node) -> Location {
        self.marker(node.span.start)
    }

    fn error(&mut self, node: &Node, message: impl Into<String>) {
        let location = self.at(node);
        self.diags.error(location, message);
    }

    /// The text of a scalar as written in the file (for `0042`, not `42`).
    fn source_text(&self, node: &Node) -> Option<String> {
        let (start, end) = (node.span.start.index(), node.span.end.index());
        let text: String = self
            .text
            .chars()
            .skip(start)
            .take(end.saturating_sub(start))
            .collect();
        // An alias (`*x`) spans its own name, not the value it stands for.
        (!text.is_empty() && !text.contains('\n') && !text.starts_with('*')).then_some(text)
    }

    /// Reports that `what` (e.g. `"name"`) is not `expected` (e.g. "a string").
    fn wrong_type(&mut self, node: &Node, what: &str, expected: &str) {
        let message = match &node.data {
            YamlData::Tagged(tag, _) => format!("YAML tags such as {tag} are not supported"),
            YamlData::Alias(_) | YamlData::BadValue => {
                format!("{what} has an invalid value (does it have a wrong !! tag?)")
            }
            YamlData::Value(Scalar::Integer(_) | Scalar::FloatingPoint(_) | Scalar::Boolean(_))
                if expected == "a string" =>
            {
                let quoted = self
                    .source_text(node)
                    .map(|text| format!(": write it in quotes, \"{text}\""))
                    .unwrap_or_default();
                format!("{what} must be a string, found {}{quoted}", describe(node))
            }
            _ => format!("{what} must be {expected}, found {}", describe(node)),
        };
        self.error(node, message);
    }

    fn string<'n>(&mut self, node: &'n Node, what: &str) -> Option<&'n str> {
        match &node.data {
            YamlData::Value(Scalar::String(s)) => Some(s),
            _ => {
                self.wrong_type(node, what, "a string");
                None
            }
        }
    }

    /// The items of a list, each checked by `item`; items that fail are left out.
    fn list<'n, 'i, T>(
        &mut self,
        node: &'n Node<'i>,
        what: &str,
        mut item: impl FnMut(&mut Self, &'n Node<'i>) -> Option<T>,
    ) -> Vec<T> {
        match &node.data {
            YamlData::Sequence(items) => items.iter().filter_map(|n| item(self, n)).collect(),
            _ => {
                self.wrong_type(node, what, "a list");
                Vec::new()
            }
        }
    }

    /// Checks that `node` is a mapping whose keys are all in `keys`.
    fn fields<'n, 'i>(
        &mut self,
        node: &'n Node<'i>,
        what: &'static str,
        keys: &[&'static str],
    ) -> Option<Fields<'n, 'i>> {
        let YamlData::Mapping(map) = &node.data else {
            self.wrong_type(node, what, "a mapping of keys to values");
            return None;
        };
        let mut entries = Vec::with_capacity(map.len());
        for (key_node, value) in map {
            let YamlData::Value(Scalar::String(key)) = &key_node.data else {
                self.wrong_type(key_node, "a key", "a string");
                continue;
            };
            match keys.iter().find(|k| **k == key.as_ref()) {
                Some(&k) => entries.push((k, key_node, value)),
                None => {
                    let hint = match suggest(key, keys.iter().copied()) {
                        Some(close) => format!(" (did you mean {close:?}?)"),
                        None => format!(" (expected one of: {})", keys.join(", ")),
                    };
                    self.error(key_node, format!("unknown key {key:?} in {what}{hint}"));
                }
            }
        }
        Some(Fields {
            node,
            what,
            entries,
        })
    }

    /// A required key; reports it missing at the mapping, or empty at the key.
    fn required<'n, 'i>(
        &mut self,
        fields: &Fields<'n, 'i>,
        key: &str,
        hint: &str,
    ) -> Option<&'n Node<'i>> {
        match fields.entries.iter().find(|(k, _, _)| *k == key) {
            None => {
                let message = format!("{} is missing required key {key:?}{hint}", fields.what);
                self.error(fields.node, message);
                None
            }
            Some(&(_, key_node, value)) if is_null(value) => {
                self.error(key_node, format!("{key:?} has no value{hint}"));
                None
            }
            Some(&(_, _, value)) => Some(value),
        }
    }

    fn document(&mut self, doc: &Node) {
        // Only `---` or comments: nothing to check.
        if is_null(doc) {
            return;
        }
        let YamlData::Mapping(map) = &doc.data else {
            self.wrong_type(
                doc,
                "a document",
                "a mapping with a \"kind\" (Segment, Zone or Quarantine)",
            );
            return;
        };
        let kind = map
            .iter()
            .find(|(k, _)| matches!(&k.data, YamlData::Value(Scalar::String(s)) if s == "kind"))
            .map(|(_, v)| v);
        let Some(kind) = kind else {
            self.error(
                doc,
                "document is missing required key \"kind\" (Segment, Zone or Quarantine)",
            );
            return;
        };
        match self.string(kind, "\"kind\"") {
            Some("Segment") => self.segment(doc),
            Some("Zone") => self.zone(doc),
            Some("Quarantine") => self.quarantine(doc),
            Some(other) => {
                let hint = match suggest(other, KINDS.iter().copied()) {
                    Some(close) => format!(" (did you mean {close:?}?)"),
                    None => " (expected Segment, Zone or Quarantine)".into(),
                };
                self.error(kind, format!("unknown kind {other:?}{hint}"));
            }
            None => {}
        }
    }

    fn segment(&mut self, doc: &Node) {
        let Some(f) = self.fields(doc, "Segment", SEGMENT_KEYS) else {
            return;
        };
        let name = self
            .required(&f, "name", "")
            .and_then(|n| self.name(n, "\"name\"", "name"));
        let description = f
            .get("description")
            .and_then(|n| self.string(n, "\"description\""))
            .map(str::to_owned);
        let mode = f.get("mode").and_then(|n| self.mode(n)).unwrap_or_default();
        let devices = f
            .get("devices")
            .map(|n| self.list(n, "\"devices\"", Self::device))
            .unwrap_or_default();
        let allow = f
            .get("allow")
            .map(|n| self.list(n, "\"allow\"", |w, item| w.rule(item, "allow rule", "to")))
            .unwrap_or_default();
        let accept = f
            .get("accept")
            .map(|n| {
                self.list(n, "\"accept\"", |w, item| {
                    w.rule(item, "accept rule", "from")
                })
            })
            .unwrap_or_default();
        let location = self.at(doc);
        self.docs.push(RawDoc::Segment(RawSegment {
            name,
            description,
            mode,
            devices,
            allow,
            accept,
            location,
        }));
    }

    fn zone(&mut self, doc: &Node) {
        let Some(f) = self.fields(doc, "Zone", ZONE_KEYS) else {
            return;
        };
        let name = self
            .required(&f, "name", "")
            .and_then(|n| self.name(n, "\"name\"", "name"));
        let mut cidrs = Vec::new();
        if let Some(list) = self.required(&f, "cidrs", "") {
            cidrs = self.list(list, "\"cidrs\"", |w, item| {
                let text = w.string(item, "an entry of \"cidrs\"")?;
                parse_cidr(text)
                    .map_err(|message| w.error(item, message))
                    .ok()
            });
            if matches!(&list.data, YamlData::Sequence(items) if items.is_empty()) {
                self.error(list, "\"cidrs\" is empty: a zone needs at least one CIDR");
            }
        }
        let location = self.at(doc);
        self.docs.push(RawDoc::Zone(RawZone {
            name,
            cidrs,
            location,
        }));
    }

    fn quarantine(&mut self, doc: &Node) {
        let Some(f) = self.fields(doc, "Quarantine", QUARANTINE_KEYS) else {
            return;
        };
        let allow = f
            .get("allow")
            .map(|n| self.list(n, "\"allow\"", |w, item| w.rule(item, "allow rule", "to")))
            .unwrap_or_default();
        let triggers = f
            .get("triggers")
            .and_then(|n| self.triggers(n))
            .unwrap_or_default();
        let exempt = f
            .get("exempt")
            .map(|n| {
                self.list(n, "\"exempt\"", |w, item| {
                    let name = w.string(item, "an entry of \"exempt\"")?.to_owned();
                    let location = w.at(item);
                    Some(Named { name, location })
                })
            })
            .unwrap_or_default();
        let location = self.at(doc);
        self.docs.push(RawDoc::Quarantine(RawQuarantine {
            allow,
            triggers,
            exempt,
            location,
        }));
    }

    /// A segment or zone name, or a device id. A malformed one is reported but still kept, so
    /// that the rules naming it do not each report an unknown target as well.
    fn name(&mut self, node: &Node, what: &str, label: &str) -> Option<Named> {
        let name = self.string(node, what)?.to_owned();
        if !is_valid_name(&name) {
            self.error(
                node,
                format!(
                    "invalid {label} {name:?}: use 1 to 63 lowercase letters, digits, \".\", \
                     \"_\" or \"-\", starting with a letter or digit"
                ),
            );
        } else if name == "gateway" {
            self.error(
                node,
                format!("\"gateway\" cannot be a {label}: in \"to:\" it means the gateway itself"),
            );
        } else if name.parse::<IpAddr>().is_ok() {
            self.error(
                node,
                format!("{label} {name:?} looks like an IP address; \"to:\" would be ambiguous"),
            );
        }
        Some(Named {
            name,
            location: self.at(node),
        })
    }

    fn mode(&mut self, node: &Node) -> Option<Mode> {
        match self.string(node, "\"mode\"")? {
            "enforce" => Some(Mode::Enforce),
            "audit" => Some(Mode::Audit),
            other => {
                self.error(
                    node,
                    format!("unknown mode {other:?} (expected enforce or audit)"),
                );
                None
            }
        }
    }

    fn device(&mut self, node: &Node) -> Option<RawDevice> {
        let f = self.fields(node, "device", DEVICE_KEYS)?;
        let id = self
            .required(&f, "id", "")
            .and_then(|n| self.name(n, "\"id\"", "device id"));
        let mac = f.get("mac").and_then(|n| {
            let text = self.string(n, "\"mac\"")?;
            mac_address(text)
                .map_err(|message| self.error(n, message))
                .ok()
        });
        let addresses = f
            .get("addresses")
            .map(|n| {
                self.list(n, "\"addresses\"", |w, item| {
                    let text = w.string(item, "an entry of \"addresses\"")?;
                    match device_address(text) {
                        Ok(ip) => Some((ip, w.at(item))),
                        Err(message) => {
                            w.error(item, message);
                            None
                        }
                    }
                })
            })
            .unwrap_or_default();
        Some(RawDevice {
            id,
            mac,
            addresses,
            location: self.at(node),
        })
    }

    /// An allow rule (`target_key` = "to") or an accept rule ("from").
    fn rule(&mut self, node: &Node, what: &'static str, target_key: &str) -> Option<RawRule> {
        let keys = if target_key == "to" {
            ALLOW_KEYS
        } else {
            ACCEPT_KEYS
        };
        let f = self.fields(node, what, keys)?;
        let target = self.required(&f, target_key, "").and_then(|n| {
            let name = self.string(n, &format!("{target_key:?}"))?.to_owned();
            Some(Named {
                name,
                location: self.at(n),
            })
        });
        let ports = self
            .required(&f, "ports", PORTS_HINT)
            .map(|n| self.ports(n));
        Some(RawRule {
            target: target?,
            ports: ports?,
            location: self.at(node),
        })
    }

    fn ports(&mut self, node: &Node) -> Vec<PortSpec> {
        if matches!(&node.data, YamlData::Sequence(items) if items.is_empty()) {
            self.error(node, format!("\"ports\" is empty{PORTS_HINT}"));
            return Vec::new();
        }
        self.list(node, "\"ports\"", |w, item| {
            let parsed = match &item.data {
                YamlData::Value(Scalar::Integer(n)) => {
                    let text = w.source_text(item).unwrap_or_else(|| n.to_string());
                    Err(format!("{text} needs a protocol, e.g. \"{text}/tcp\""))
                }
                _ => parse_port_spec(w.string(item, "an entry of \"ports\"")?),
            };
            match parsed {
                Ok((protocol, ports)) => Some(PortSpec {
                    protocol,
                    ports,
                    location: w.at(item),
                }),
                Err(message) => {
                    w.error(item, message);
                    None
                }
            }
        })
    }

    fn triggers(&mut self, node: &Node) -> Option<Triggers> {
        let f = self.fields(node, "\"triggers\"", TRIGGERS_KEYS)?;
        let denied_flows = f.get("denied_flows").and_then(|n| {
            let f = self.fields(n, "\"denied_flows\"", DENIED_FLOWS_KEYS)?;
            let count = self
                .required(&f, "count", "")
                .and_then(|n| self.positive(n, "count"));
            let window = self
                .required(&f, "window", "")
                .and_then(|n| self.duration(n));
            Some(DeniedFlowsTrigger {
                count: count?,
                window: window?,
            })
        });
        let fanout = f.get("fanout").and_then(|n| {
            let f = self.fields(n, "\"fanout\"", FANOUT_KEYS)?;
            let destinations = self
                .required(&f, "destinations", "")
                .and_then(|n| self.positive(n, "destinations"));
            let window = self
                .required(&f, "window", "")
                .and_then(|n| self.duration(n));
            Some(FanoutTrigger {
                destinations: destinations?,
                window: window?,
            })
        });
        Some(Triggers {
            denied_flows,
            fanout,
        })
    }

    fn positive(&mut self, node: &Node, key: &str) -> Option<u32> {
        let YamlData::Value(Scalar::Integer(n)) = node.data else {
            self.wrong_type(node, &format!("{key:?}"), "a whole number");
            return None;
        };
        match u32::try_from(n) {
            Ok(0) => self.error(node, format!("{key:?} must be greater than 0")),
            Ok(n) => return Some(n),
            Err(_) if n < 0 => self.error(node, format!("{key:?} must be greater than 0")),
            Err(_) => self.error(node, format!("{key:?} is too large (at most {})", u32::MAX)),
        }
        None
    }

    fn duration(&mut self, node: &Node) -> Option<Duration> {
        let parsed = match &node.data {
            YamlData::Value(Scalar::Integer(n)) => {
                let text = self.source_text(node).unwrap_or_else(|| n.to_string());
                Err(format!(
                    "{text} needs a unit, e.g. \"{text}s\" (units: ms, s, m, h)"
                ))
            }
            _ => parse_duration(self.string(node, "\"window\"")?),
        };
        parsed.map_err(|message| self.error(node, message)).ok()
    }
}

/// `[a-z0-9][a-z0-9._-]{0,62}`
fn is_valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    let inner = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(b);
    match bytes.split_first() {
        Some((first, rest)) => {
            bytes.len() <= 63
                && (first.is_ascii_lowercase() || first.is_ascii_digit())
                && rest.iter().all(inner)
        }
        None => false,
    }
}

fn mac_address(text: &str) -> Result<MacAddr, String> {
    let mut bytes = [0u8; 6];
    let mut parts = text.split(':');
    let parsed = bytes.iter_mut().all(|byte| {
        let Some(part) = parts.next() else {
            return false;
        };
        let hex = part.len() == 2 && part.bytes().all(|c| c.is_ascii_hexdigit());
        match u8::from_str_radix(part, 16) {
            Ok(value) if hex => {
                *byte = value;
                true
            }
            _ => false,
        }
    });
    if !parsed || parts.next().is_some() {
        return Err(format!(
            "invalid MAC address {text:?} (expected six hex pairs, e.g. \"02:00:00:00:10:01\")"
        ));
    }
    let mac = MacAddr(bytes);
    // A frame can never carry these as its source, so enforcing them would cut the device off.
    if bytes == [0; 6] {
        Err(format!("{mac} cannot be a device's MAC address"))
    } else if bytes[0] & 1 == 1 {
        Err(format!(
            "{mac} is a multicast or broadcast MAC address; a device's MAC is unicast"
        ))
    } else {
        Ok(mac)
    }
}

/// A device's static address: a single unicast address.
fn device_address(text: &str) -> Result<IpAddr, String> {
    if text.contains('/') {
        return Err(format!(
            "{text:?} is a prefix; \"addresses\" takes single addresses (use a Zone for ranges)"
        ));
    }
    let ip: IpAddr = text
        .parse()
        .map_err(|_| format!("invalid IP address {text:?}"))?;
    // Binding one of these to a device would give its permissions to packets that carry
    // them (e.g. 0.0.0.0 is the source of every DHCP discover).
    let what = if ip.is_unspecified() {
        "the unspecified address"
    } else if ip.is_loopback() {
        "a loopback address"
    } else if ip.is_multicast() {
        "a multicast address"
    } else if ip == IpAddr::from([255, 255, 255, 255]) {
        "the broadcast address"
    } else {
        return Ok(ip);
    };
    Err(format!("{ip} is {what}; it cannot be a device's address"))
}

/// `10.0.0.0/8`, `2001:db8::/32`, or a single address (as a /32 or /128).
fn parse_cidr(text: &str) -> Result<IpNet, String> {
    if text.contains('/') {
        let net: IpNet = text
            .parse()
            .map_err(|_| format!("invalid CIDR {text:?} (expected e.g. \"10.0.0.0/16\")"))?;
        if net.trunc() != net {
            return Err(format!(
                "{text} has host bits set; did you mean {}?",
                net.trunc()
            ));
        }
        Ok(net)
    } else {
        text.parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| format!("invalid IP address {text:?}"))
    }
}

/// Whether a `to:` / `from:` value is meant as an address or CIDR rather than a name.
fn looks_like_address(text: &str) -> bool {
    text.contains(['/', ':'])
        || (text.contains('.') && text.bytes().all(|b| b.is_ascii_digit() || b == b'.'))
}

fn parse_port_spec(spec: &str) -> Result<(Protocol, RangeInclusive<u16>), String> {
    let invalid = || {
        format!(
            "invalid port spec {spec:?} (expected \"PORT/PROTO\", \"LOW-HIGH/PROTO\", \"tcp\", \
             \"udp\", \"sctp\", \"icmp\", \"icmpv6\" or \"any\")"
        )
    };
    if let Some(protocol) = bare_protocol(spec) {
        return Ok((protocol, PortSpec::ALL_PORTS));
    }
    let Some((ports, proto)) = spec.split_once('/') else {
        if bare_protocol(&spec.to_ascii_lowercase()).is_some() {
            return Err(format!(
                "write protocols in lowercase: {:?}",
                spec.to_ascii_lowercase()
            ));
        }
        let port_like = spec.starts_with(|c: char| c.is_ascii_digit())
            && spec.bytes().all(|b| b.is_ascii_digit() || b == b'-');
        return Err(if port_like {
            format!("{spec:?} needs a protocol, e.g. \"{spec}/tcp\"")
        } else {
            invalid()
        });
    };
    // `icmp/8` or `8/icmp`: ICMP types and "any" cannot be narrowed down.
    if let Some(whole) = [ports, proto].into_iter().find(|p| {
        matches!(
            bare_protocol(p),
            Some(Protocol::Icmp | Protocol::Icmpv6 | Protocol::Any)
        )
    }) {
        return Err(format!(
            "{spec:?}: {whole:?} takes no port or type, write just {whole:?}"
        ));
    }
    let protocol = match proto {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "sctp" => Protocol::Sctp,
        _ => {
            return Err(format!(
                "unknown protocol {proto:?} in {spec:?} (expected tcp, udp or sctp, in lowercase)"
            ));
        }
    };
    let port = |text: &str| -> Result<u16, String> {
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        match text.parse::<u32>().map(u16::try_from) {
            Ok(Ok(0)) => Err(format!(
                "port 0 in {spec:?} is not a usable port (ports are 1-65535)"
            )),
            Ok(Ok(port)) => Ok(port),
            _ => Err(format!(
                "port {text} in {spec:?} is out of range (ports are 1-65535)"
            )),
        }
    };
    match ports.split_once('-') {
        None => {
            let p = port(ports)?;
            Ok((protocol, p..=p))
        }
        Some((low, high)) => {
            let (low, high) = (port(low)?, port(high)?);
            if low > high {
                return Err(format!(
                    "port range {spec:?} is backwards: write \"{high}-{low}/{proto}\""
                ));
            }
            Ok((protocol, low..=high))
        }
    }
}

fn bare_protocol(spec: &str) -> Option<Protocol> {
    Some(match spec {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        "sctp" => Protocol::Sctp,
        "icmp" => Protocol::Icmp,
        "icmpv6" => Protocol::Icmpv6,
        "any" => Protocol::Any,
        _ => return None,
    })
}

/// `10s`, `500ms`, `2m`, `1h`; more than zero.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = || {
        format!(
            "invalid duration {text:?} (expected a whole number and a unit: \"500ms\", \"10s\", \
             \"2m\" or \"1h\")"
        )
    };
    let digits = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    if number.is_empty() {
        return Err(invalid());
    }
    let too_long = || format!("duration {text:?} is too long");
    let n: u64 = number.parse().map_err(|_| too_long())?;
    let duration = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(too_long)?),
        "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(too_long)?),
        "" => {
            return Err(format!(
                "{text:?} needs a unit, e.g. \"{text}s\" (units: ms, s, m, h)"
            ))
        }
        _ => return Err(invalid()),
    };
    if duration.is_zero() {
        return Err(format!("duration {text:?} must be longer than 0"));
    }
    Ok(duration)
}

/// The candidate closest to `word` by edit distance, if it is close enough to be a typo.
fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let word = word.to_lowercase();
    let len = word.chars().count();
    // Long inputs are not typos of short names, and would make this quadratic for nothing.
    if len == 0 || len > 100 {
        return None;
    }
    let max = (len / 3).clamp(1, 3);
    candidates
        .into_iter()
        .map(|c| (edit_distance(&word, &c.to_lowercase()), c))
        .filter(|&(distance, _)| distance <= max)
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, c)| c)
}

fn did_you_mean(suggestion: Option<&str>) -> String {
    suggestion
        .map(|s| format!(" (did you mean {s:?}?)"))
        .unwrap_or_default()
}

/// Edit distance in characters, counting a swap of two neighbours as one edit (the most
/// common typo: `prots` for `ports`).
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // Rows i-2, i-1 and i of the distance table.
    let mut before: Vec<usize> = vec![0; b.len() + 1];
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        current[0] = i;
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (previous[j - 1] + cost)
                .min(previous[j] + 1)
                .min(current[j - 1] + 1);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(before[j - 2] + 1);
            }
            current[j] = best;
        }
        std::mem::swap(&mut before, &mut previous);
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

// ---------------------------------------------------------------------------------------------
// Second pass: names across files.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NameKind {
    Segment,
    Zone,
}

impl fmt::Display for NameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NameKind::Segment => "segment",
            NameKind::Zone => "zone",
        })
    }
}

struct DeviceDef<'d> {
    segment: Option<&'d str>,
    location: &'d Location,
}

/// Every name in the policy, for resolving references; borrowed from the documents.
#[derive(Default)]
struct Names<'d> {
    /// Segment and zone names share one namespace.
    names: BTreeMap<&'d str, (NameKind, &'d Location)>,
    devices: HashMap<&'d str, DeviceDef<'d>>,
}

impl<'d> Names<'d> {
    fn collect(docs: &'d [RawDoc], diags: &mut Diagnostics) -> Names<'d> {
        let mut names = Names::default();
        for doc in docs {
            let (kind, named) = match doc {
                RawDoc::Segment(s) => (NameKind::Segment, &s.name),
                RawDoc::Zone(z) => (NameKind::Zone, &z.name),
                RawDoc::Quarantine(_) => continue,
            };
            let Some(named) = named else { continue };
            match names.names.entry(&named.name) {
                Entry::Vacant(v) => {
                    v.insert((kind, &named.location));
                }
                Entry::Occupied(o) => {
                    let (first_kind, first) = o.get();
                    let message = if *first_kind == kind {
                        format!(
                            "duplicate {kind} name {:?} (first defined at {first})",
                            named.name
                        )
                    } else {
                        format!(
                            "{kind} name {:?} is already the name of a {first_kind} (defined at \
                             {first}); segments and zones share one namespace",
                            named.name
                        )
                    };
                    diags.error(named.location.clone(), message);
                }
            }
        }
        // Device ids after all segment and zone names, so that a clash is found whatever the
        // order of the files.
        // Each address with its device (its place among all devices, and itself).
        let mut addresses: HashMap<IpAddr, (usize, &RawDevice, &Location)> = HashMap::new();
        let all_devices = docs
            .iter()
            .filter_map(|doc| match doc {
                RawDoc::Segment(s) => Some(s),
                _ => None,
            })
            .flat_map(|s| s.devices.iter().map(move |d| (s, d)));
        for (owner, (segment, device)) in all_devices.enumerate() {
            if let Some(id) = &device.id {
                if let Some((kind, location)) = names.names.get(id.name.as_str()) {
                    diags.error(
                        id.location.clone(),
                        format!(
                            "device id {:?} is also a {kind} name (defined at {location}); \
                             targets would be ambiguous",
                            id.name
                        ),
                    );
                }
                match names.devices.entry(&id.name) {
                    hash_map::Entry::Vacant(v) => {
                        v.insert(DeviceDef {
                            segment: segment.name.as_ref().map(|n| n.name.as_str()),
                            location: &id.location,
                        });
                    }
                    hash_map::Entry::Occupied(o) => diags.error(
                        id.location.clone(),
                        format!(
                            "duplicate device id {:?} (first defined at {})",
                            id.name,
                            o.get().location
                        ),
                    ),
                }
            }
            for (ip, location) in &device.addresses {
                // `::ffff:10.0.0.1` is the same host as `10.0.0.1`.
                match addresses.entry(ip.to_canonical()) {
                    hash_map::Entry::Vacant(v) => {
                        v.insert((owner, device, location));
                    }
                    hash_map::Entry::Occupied(o) => {
                        let (first_owner, first_device, first) = *o.get();
                        let message = if first_owner == owner {
                            format!(
                                "address {ip} is listed twice for {} (first at {first})",
                                device.label()
                            )
                        } else {
                            format!(
                                "address {ip} is already bound to {} (at {first}); an address \
                                 belongs to one device",
                                first_device.label()
                            )
                        };
                        diags.error(location.clone(), message);
                    }
                }
            }
        }
        names
    }

    /// The device ids in order, for suggestions (a tie goes to the first).
    fn device_ids(&self) -> Vec<&'d str> {
        let mut ids: Vec<&str> = self.devices.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    fn kind_of(&self, name: &str) -> Option<NameKind> {
        self.names.get(name).map(|(kind, _)| *kind)
    }

    fn target(&self, to: &Named, diags: &mut Diagnostics) -> Option<Target> {
        let name = to.name.as_str();
        if name == "gateway" {
            return Some(Target::Gateway);
        }
        match self.kind_of(name) {
            Some(NameKind::Segment) => return Some(Target::Segment(name.into())),
            Some(NameKind::Zone) => return Some(Target::Zone(name.into())),
            None => {}
        }
        if self.devices.contains_key(name) {
            return Some(Target::Device(name.into()));
        }
        if looks_like_address(name) {
            return parse_cidr(name)
                .map(Target::Cidr)
                .map_err(|message| diags.error(to.location.clone(), message))
                .ok();
        }
        let candidates = self
            .names
            .keys()
            .copied()
            .chain(self.device_ids())
            .chain(["gateway"]);
        let hint = did_you_mean(suggest(name, candidates));
        diags.error(
            to.location.clone(),
            format!("unknown target {name:?}{hint}"),
        );
        None
    }

    fn source(&self, from: &Named, diags: &mut Diagnostics) -> Option<Source> {
        let name = from.name.as_str();
        let only = "\"from:\" takes a zone or a CIDR";
        let message = match self.kind_of(name) {
            Some(NameKind::Zone) => return Some(Source::Zone(name.into())),
            Some(NameKind::Segment) => format!(
                "{name:?} is a segment; {only} (to let segment {name:?} reach these devices, \
                 give it an allow rule)"
            ),
            None if name == "gateway" => format!("\"gateway\" cannot be a source; {only}"),
            None => match self.devices.get(name) {
                Some(DeviceDef {
                    segment: Some(segment),
                    ..
                }) => format!(
                    "{name:?} is a device; {only} (to let it reach these devices, give its \
                     segment {segment:?} an allow rule)"
                ),
                Some(_) => format!("{name:?} is a device; {only}"),
                None if looks_like_address(name) => {
                    return parse_cidr(name)
                        .map(Source::Cidr)
                        .map_err(|message| diags.error(from.location.clone(), message))
                        .ok();
                }
                None => {
                    let zones = self
                        .names
                        .iter()
                        .filter(|(_, (kind, _))| *kind == NameKind::Zone)
                        .map(|(n, _)| *n);
                    let hint = did_you_mean(suggest(name, zones));
                    format!("unknown source {name:?}{hint}; {only}")
                }
            },
        };
        diags.error(from.location.clone(), message);
        None
    }

    fn exempt(&self, device: &Named, diags: &mut Diagnostics) -> Option<String> {
        let name = device.name.as_str();
        if self.devices.contains_key(name) {
            return Some(name.into());
        }
        let message = match self.kind_of(name) {
            Some(kind) => format!("{name:?} is a {kind}; \"exempt\" lists device ids"),
            None => {
                let hint = did_you_mean(suggest(name, self.device_ids()));
                format!("unknown device {name:?} in \"exempt\"{hint}")
            }
        };
        diags.error(device.location.clone(), message);
        None
    }

    /// What the rules of `doc` name, resolved (`None`: reported).
    fn resolve(&self, doc: &RawDoc, diags: &mut Diagnostics) -> Resolved {
        let targets = |rules: &[RawRule], diags: &mut Diagnostics| -> Vec<Option<Target>> {
            rules
                .iter()
                .map(|r| self.target(&r.target, diags))
                .collect()
        };
        match doc {
            RawDoc::Segment(s) => Resolved {
                allow: targets(&s.allow, diags),
                accept: s
                    .accept
                    .iter()
                    .map(|r| self.source(&r.target, diags))
                    .collect(),
                exempt: Vec::new(),
            },
            RawDoc::Quarantine(q) => Resolved {
                allow: targets(&q.allow, diags),
                accept: Vec::new(),
                exempt: q
                    .exempt
                    .iter()
                    .filter_map(|d| self.exempt(d, diags))
                    .collect(),
            },
            RawDoc::Zone(_) => Resolved::default(),
        }
    }
}

/// A document's references, resolved: one target per allow rule, one source per accept
/// rule (`None` where it failed), and the exempt devices.
#[derive(Default)]
struct Resolved {
    allow: Vec<Option<Target>>,
    accept: Vec<Option<Source>>,
    exempt: Vec<String>,
}

fn allow_rules(rules: Vec<RawRule>, targets: Vec<Option<Target>>) -> Vec<AllowRule> {
    rules
        .into_iter()
        .zip(targets)
        .filter_map(|(rule, to)| {
            Some(AllowRule {
                to: to?,
                ports: rule.ports,
                location: rule.location,
            })
        })
        .collect()
}

fn accept_rules(rules: Vec<RawRule>, sources: Vec<Option<Source>>) -> Vec<AcceptRule> {
    rules
        .into_iter()
        .zip(sources)
        .filter_map(|(rule, from)| {
            Some(AcceptRule {
                from: from?,
                ports: rule.ports,
                location: rule.location,
            })
        })
        .collect()
}

/// Resolves all references and builds the policy. The result is only meaningful when no
/// errors were reported: parts that failed are left out.
fn assemble(docs: Vec<RawDoc>, diags: &mut Diagnostics) -> Policy {
    // References are resolved while the names borrow the documents, which are then taken
    // apart into the policy.
    let resolved: Vec<Resolved> = {
        let names = Names::collect(&docs, diags);
        docs.iter().map(|doc| names.resolve(doc, diags)).collect()
    };
    let mut policy = Policy::default();
    for (doc, resolved) in docs.into_iter().zip(resolved) {
        match doc {
            RawDoc::Segment(s) => {
                let allow = allow_rules(s.allow, resolved.allow);
                let accept = accept_rules(s.accept, resolved.accept);
                let devices = s
                    .devices
                    .into_iter()
                    .filter_map(|d| {
                        Some(Device {
                            id: d.id?.name,
                            mac: d.mac,
                            addresses: d.addresses.into_iter().map(|(ip, _)| ip).collect(),
                            location: d.location,
                        })
                    })
                    .collect();
                if let Some(name) = s.name {
                    policy.segments.push(Segment {
                        name: name.name,
                        description: s.description,
                        mode: s.mode,
                        devices,
                        allow,
                        accept,
                        location: s.location,
                    });
                }
            }
            RawDoc::Zone(z) => {
                if let Some(name) = z.name {
                    policy.zones.push(Zone {
                        name: name.name,
                        cidrs: z.cidrs,
                        location: z.location,
                    });
                }
            }
            RawDoc::Quarantine(q) => {
                // Resolved even when it is a second one, to report its own problems too.
                let allow = allow_rules(q.allow, resolved.allow);
                let exempt = resolved.exempt;
                if let Some(first) = &policy.quarantine {
                    diags.error(
                        q.location,
                        format!(
                            "a policy has at most one Quarantine (the first is at {})",
                            first.location
                        ),
                    );
                } else {
                    policy.quarantine = Some(Quarantine {
                        allow,
                        triggers: q.triggers,
                        exempt,
                        location: q.location,
                    });
                }
            }
        }
    }
    policy
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::policy::dedent;

    fn load(text: &str) -> Result<Policy, LoadError> {
        load_str(Path::new("t.yaml"), &dedent(text))
    }

    fn valid(text: &str) -> Policy {
        match load(text) {
            Ok(policy) => policy,
            Err(e) => panic!("expected a valid policy, got:\n{e}"),
        }
    }

    /// The diagnostics of an invalid policy, as printed.
    fn errors(text: &str) -> Vec<String> {
        errors_of(load(text))
    }

    fn errors_of(result: Result<Policy, LoadError>) -> Vec<String> {
        match result {
            Ok(_) => panic!("expected errors, the policy is valid"),
            Err(e) => e.diagnostics().iter().map(ToString::to_string).collect(),
        }
    }

    /// A segment file around `body`, for tests of one part. Line 1 is `kind`, line 2 `name`,
    /// `body` starts on line 3.
    fn segment(body: &str) -> String {
        format!("kind: Segment\nname: s\n{}", dedent(body))
    }

    fn segment_errors(body: &str) -> Vec<String> {
        errors_of(load_str(Path::new("t.yaml"), &segment(body)))
    }

    fn loc(file: &str, line: usize, column: usize) -> Location {
        Location {
            file: Arc::new(PathBuf::from(file)),
            line,
            column,
        }
    }

    const SPEC_EXAMPLE: &str = r#"
        kind: Segment
        name: sensors
        description: Temperature and vibration sensors      # optional
        mode: enforce
        devices:
          - id: temp-001
            mac: "02:00:00:00:10:01"
            addresses: [10.20.1.11]
          - id: temp-002
            mac: "02:00:00:00:10:02"
        allow:
          - to: mqtt-broker
            ports: ["8883/tcp"]
          - to: 10.0.0.0/16
            ports: ["123/udp", "icmp"]
        accept:
          - from: ops-vpn
            ports: ["22/tcp"]
        ---
        kind: Zone
        name: ops-vpn
        cidrs: [192.0.2.0/24, "2001:db8:9::/48"]
        ---
        kind: Segment
        name: brokers
        mode: audit
        devices:
          - id: mqtt-broker
            mac: "02:AA:bb:00:00:01"
            addresses: [10.20.2.10, "fd00::10"]
          - id: plc-7
        allow:
          - to: gateway
            ports: [any]
          - to: sensors
            ports: ["1-1023/tcp", "5683-5684/udp", sctp, icmpv6, "udp"]
        ---
        kind: Segment
        name: remediation
        ---
        kind: Quarantine
        allow:
          - to: remediation
            ports: ["443/tcp"]
        triggers:
          denied_flows: {count: 20, window: 10s}
          fanout: {destinations: 50, window: 2m}
        exempt: [plc-7]
    "#;

    #[test]
    fn realistic_policy_loads_into_the_model() {
        let policy = valid(SPEC_EXAMPLE);
        let names: Vec<_> = policy.segments.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["sensors", "brokers", "remediation"]);

        let sensors = &policy.segments[0];
        assert_eq!(sensors.location, loc("t.yaml", 1, 1));
        assert_eq!(
            sensors.description.as_deref(),
            Some("Temperature and vibration sensors")
        );
        assert_eq!(sensors.mode, Mode::Enforce);
        assert_eq!(sensors.devices.len(), 2);
        let temp1 = &sensors.devices[0];
        assert_eq!(temp1.id, "temp-001");
        assert_eq!(temp1.mac, Some(MacAddr([2, 0, 0, 0, 0x10, 1])));
        assert_eq!(
            temp1.addresses,
            [IpAddr::from(Ipv4Addr::new(10, 20, 1, 11))]
        );
        // The list item's mapping starts at its first key.
        assert_eq!(temp1.location, loc("t.yaml", 6, 5));
        assert!(sensors.devices[1].addresses.is_empty());

        let rule = &sensors.allow[0];
        assert_eq!(rule.to, Target::Device("mqtt-broker".into()));
        assert_eq!(rule.location, loc("t.yaml", 12, 5));
        assert_eq!(
            rule.ports,
            [PortSpec {
                protocol: Protocol::Tcp,
                ports: 8883..=8883,
                location: loc("t.yaml", 13, 13),
            }]
        );
        let rule = &sensors.allow[1];
        assert_eq!(rule.to, Target::Cidr("10.0.0.0/16".parse().unwrap()));
        let specs: Vec<_> = rule.ports.iter().map(ToString::to_string).collect();
        assert_eq!(specs, ["123/udp", "icmp"]);
        assert_eq!(rule.ports[1].ports, PortSpec::ALL_PORTS);
        assert_eq!(sensors.accept[0].from, Source::Zone("ops-vpn".into()));
        assert_eq!(sensors.accept[0].location, loc("t.yaml", 17, 5));

        let zone = &policy.zones[0];
        assert_eq!(zone.name, "ops-vpn");
        assert_eq!(zone.location, loc("t.yaml", 20, 1));
        assert_eq!(
            zone.cidrs,
            [
                "192.0.2.0/24".parse::<IpNet>().unwrap(),
                "2001:db8:9::/48".parse().unwrap()
            ]
        );

        let brokers = &policy.segments[1];
        assert_eq!(brokers.mode, Mode::Audit);
        assert_eq!(
            brokers.devices[0].mac,
            Some(MacAddr([2, 0xaa, 0xbb, 0, 0, 1]))
        );
        assert_eq!(
            brokers.devices[0].addresses,
            [
                IpAddr::from(Ipv4Addr::new(10, 20, 2, 10)),
                IpAddr::from("fd00::10".parse::<Ipv6Addr>().unwrap())
            ]
        );
        assert_eq!(brokers.allow[0].to, Target::Gateway);
        assert_eq!(brokers.allow[0].ports[0].protocol, Protocol::Any);
        assert_eq!(brokers.allow[1].to, Target::Segment("sensors".into()));
        let specs: Vec<_> = brokers.allow[1]
            .ports
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            specs,
            ["1-1023/tcp", "5683-5684/udp", "sctp", "icmpv6", "udp"]
        );

        let remediation = &policy.segments[2];
        assert!(remediation.devices.is_empty() && remediation.allow.is_empty());

        let quarantine = policy.quarantine.expect("a quarantine");
        assert_eq!(quarantine.location, loc("t.yaml", 41, 1));
        assert_eq!(
            quarantine.allow[0].to,
            Target::Segment("remediation".into())
        );
        let denied = quarantine.triggers.denied_flows.expect("denied_flows");
        assert_eq!((denied.count, denied.window), (20, Duration::from_secs(10)));
        let fanout = quarantine.triggers.fanout.expect("fanout");
        assert_eq!(
            (fanout.destinations, fanout.window),
            (50, Duration::from_secs(120))
        );
        assert_eq!(quarantine.exempt, ["plc-7"]);
    }

    #[test]
    fn empty_documents_and_files_are_fine() {
        assert!(valid("").segments.is_empty());
        assert!(valid("# nothing here yet\n").segments.is_empty());
        let policy = valid(
            r#"
            ---
            ---
            # a comment only
            ---
            kind: Zone
            name: z
            cidrs: [10.0.0.0/8]
            ---
            ...
            "#,
        );
        assert_eq!(policy.zones.len(), 1);
    }

    #[test]
    fn optional_keys_may_be_empty() {
        let policy = valid(
            r#"
            kind: Segment
            name: s
            description:
            devices:
            allow:
            "#,
        );
        assert!(policy.segments[0].description.is_none());
        assert!(policy.segments[0].devices.is_empty());
    }

    #[test]
    fn anchors_and_aliases_are_resolved() {
        let policy = valid(
            r#"
            kind: Segment
            name: s
            allow:
              - to: gateway
                ports: &web ["80/tcp", "443/tcp"]
              - to: 10.0.0.1
                ports: *web
            "#,
        );
        let rule = &policy.segments[0].allow[1];
        assert_eq!(rule.to, Target::Cidr("10.0.0.1/32".parse().unwrap()));
        assert_eq!(rule.ports.len(), 2);
    }

    #[test]
    fn document_shape_errors() {
        assert_eq!(
            errors(
                r#"
                kind: Segmnet
                name: a
                ---
                kind: segment
                ---
                kind: Firewall
                ---
                name: b
                ---
                - kind: Zone
                ---
                kind: 3
                ---
                !Segment
                kind: Segment
                "#
            ),
            [
                "t.yaml:1:7: error: unknown kind \"Segmnet\" (did you mean \"Segment\"?)",
                "t.yaml:4:7: error: unknown kind \"segment\" (did you mean \"Segment\"?)",
                "t.yaml:6:7: error: unknown kind \"Firewall\" (expected Segment, Zone or Quarantine)",
                "t.yaml:8:1: error: document is missing required key \"kind\" (Segment, Zone or Quarantine)",
                "t.yaml:10:1: error: a document must be a mapping with a \"kind\" (Segment, Zone or Quarantine), found a list",
                "t.yaml:12:7: error: \"kind\" must be a string, found a number: write it in quotes, \"3\"",
                "t.yaml:14:1: error: YAML tags such as !Segment are not supported",
            ]
        );
    }

    #[test]
    fn unknown_missing_and_mistyped_keys() {
        assert_eq!(
            errors(
                r#"
                kind: Segment
                descripton: typo
                colour: blue
                7: seven
                mode: [enforce]
                devices:
                  - id: 0042
                    ip: 10.0.0.1
                  - mac: "02:00:00:00:00:01"
                  - just-a-string
                allow:
                  - to:
                    ports: ["22/tcp"]
                  - prots: ["22/tcp"]
                    to: gateway
                accept: {from: 10.0.0.0/8}
                "#
            ),
            [
                "t.yaml:1:1: error: Segment is missing required key \"name\"",
                "t.yaml:2:1: error: unknown key \"descripton\" in Segment (did you mean \"description\"?)",
                "t.yaml:3:1: error: unknown key \"colour\" in Segment (expected one of: kind, name, description, mode, devices, allow, accept)",
                "t.yaml:4:1: error: a key must be a string, found a number: write it in quotes, \"7\"",
                "t.yaml:5:7: error: \"mode\" must be a string, found a list",
                "t.yaml:7:9: error: \"id\" must be a string, found a number: write it in quotes, \"0042\"",
                "t.yaml:8:5: error: unknown key \"ip\" in device (did you mean \"id\"?)",
                "t.yaml:9:5: error: device is missing required key \"id\"",
                "t.yaml:10:5: error: device must be a mapping of keys to values, found a string",
                "t.yaml:12:5: error: \"to\" has no value",
                "t.yaml:14:5: error: unknown key \"prots\" in allow rule (did you mean \"ports\"?)",
                "t.yaml:14:5: error: allow rule is missing required key \"ports\" (nothing is allowed implicitly: list ports such as \"443/tcp\", or \"any\")",
                "t.yaml:16:9: error: \"accept\" must be a list, found a mapping",
            ]
        );
    }

    #[test]
    fn name_rules() {
        assert_eq!(
            errors(
                r#"
                kind: Segment
                name: Sensors
                devices:
                  - id: gateway
                  - id: 10.0.0.1
                  - id: -dash-first
                  - id: a-name-that-is-far-too-long-to-be-a-name-because-it-has-64-chars
                ---
                kind: Zone
                name: ""
                cidrs: [10.0.0.0/8]
                "#
            ),
            [
                "t.yaml:2:7: error: invalid name \"Sensors\": use 1 to 63 lowercase letters, digits, \".\", \"_\" or \"-\", starting with a letter or digit",
                "t.yaml:4:9: error: \"gateway\" cannot be a device id: in \"to:\" it means the gateway itself",
                "t.yaml:5:9: error: device id \"10.0.0.1\" looks like an IP address; \"to:\" would be ambiguous",
                "t.yaml:6:9: error: invalid device id \"-dash-first\": use 1 to 63 lowercase letters, digits, \".\", \"_\" or \"-\", starting with a letter or digit",
                "t.yaml:7:9: error: invalid device id \"a-name-that-is-far-too-long-to-be-a-name-because-it-has-64-chars\": use 1 to 63 lowercase letters, digits, \".\", \"_\" or \"-\", starting with a letter or digit",
                "t.yaml:10:7: error: invalid name \"\": use 1 to 63 lowercase letters, digits, \".\", \"_\" or \"-\", starting with a letter or digit",
            ]
        );
        assert!(is_valid_name("a"));
        assert!(is_valid_name("plc-7.line_2"));
        assert!(is_valid_name(&"a".repeat(63)));
        assert!(!is_valid_name(&"a".repeat(64)));
        assert!(!is_valid_name(".a"));
        assert!(!is_valid_name("a b"));
        assert!(!is_valid_name("é"));
    }

    #[test]
    fn duplicate_names_ids_and_addresses() {
        assert_eq!(
            errors(
                r#"
                kind: Segment
                name: plc
                devices:
                  - id: plc-1
                    addresses: [10.0.0.1, 10.0.0.2, 10.0.0.1]
                  - id: plc-1
                    addresses: ["::ffff:10.0.0.2"]
                  - id: lab
                ---
                kind: Segment
                name: plc
                ---
                kind: Zone
                name: plc
                cidrs: [10.0.0.0/8]
                ---
                kind: Zone
                name: lab
                cidrs: [10.0.0.0/8]
                "#
            ),
            [
                "t.yaml:5:37: error: address 10.0.0.1 is listed twice for device \"plc-1\" (first at t.yaml:5:17)",
                "t.yaml:6:9: error: duplicate device id \"plc-1\" (first defined at t.yaml:4:9)",
                "t.yaml:7:17: error: address ::ffff:10.0.0.2 is already bound to device \"plc-1\" (at t.yaml:5:27); an address belongs to one device",
                "t.yaml:8:9: error: device id \"lab\" is also a zone name (defined at t.yaml:18:7); targets would be ambiguous",
                "t.yaml:11:7: error: duplicate segment name \"plc\" (first defined at t.yaml:2:7)",
                "t.yaml:14:7: error: zone name \"plc\" is already the name of a segment (defined at t.yaml:2:7); segments and zones share one namespace",
            ]
        );
    }

    #[test]
    fn mac_and_address_errors() {
        assert_eq!(
            segment_errors(
                r#"
                devices:
                  - id: a
                    mac: "02:00:00:00:00"
                    addresses: [10.0.0.5/24, 10.0.0.300, "0.0.0.0", "ff02::1", 127.0.0.1, 255.255.255.255, 7]
                  - id: b
                    mac: "01:00:5e:00:00:01"
                  - id: c
                    mac: 00:00:00:00:00:00
                  - id: d
                    mac: "0g:00:00:00:00:01"
                "#
            ),
            [
                "t.yaml:5:10: error: invalid MAC address \"02:00:00:00:00\" (expected six hex pairs, e.g. \"02:00:00:00:10:01\")",
                "t.yaml:6:17: error: \"10.0.0.5/24\" is a prefix; \"addresses\" takes single addresses (use a Zone for ranges)",
                "t.yaml:6:30: error: invalid IP address \"10.0.0.300\"",
                "t.yaml:6:42: error: 0.0.0.0 is the unspecified address; it cannot be a device's address",
                "t.yaml:6:53: error: ff02::1 is a multicast address; it cannot be a device's address",
                "t.yaml:6:64: error: 127.0.0.1 is a loopback address; it cannot be a device's address",
                "t.yaml:6:75: error: 255.255.255.255 is the broadcast address; it cannot be a device's address",
                "t.yaml:6:92: error: an entry of \"addresses\" must be a string, found a number: write it in quotes, \"7\"",
                "t.yaml:8:10: error: 01:00:5e:00:00:01 is a multicast or broadcast MAC address; a device's MAC is unicast",
                "t.yaml:10:10: error: 00:00:00:00:00:00 cannot be a device's MAC address",
                "t.yaml:12:10: error: invalid MAC address \"0g:00:00:00:00:01\" (expected six hex pairs, e.g. \"02:00:00:00:10:01\")",
            ]
        );
    }

    #[test]
    fn port_spec_errors() {
        assert_eq!(
            segment_errors(
                r#"
                allow:
                  - to: gateway
                    ports: [8883, "8883", "80-90", TCP, 80/TCP, 0/tcp, 65536/tcp]
                  - to: gateway
                    ports: [443-80/tcp, icmp/8, "80,443/tcp", 1-/udp, true, 22/icmp]
                  - to: gateway
                    ports: []
                  - to: gateway
                    ports: "443/tcp"
                "#
            ),
            [
                "t.yaml:5:13: error: 8883 needs a protocol, e.g. \"8883/tcp\"",
                "t.yaml:5:19: error: \"8883\" needs a protocol, e.g. \"8883/tcp\"",
                "t.yaml:5:27: error: \"80-90\" needs a protocol, e.g. \"80-90/tcp\"",
                "t.yaml:5:36: error: write protocols in lowercase: \"tcp\"",
                "t.yaml:5:41: error: unknown protocol \"TCP\" in \"80/TCP\" (expected tcp, udp or sctp, in lowercase)",
                "t.yaml:5:49: error: port 0 in \"0/tcp\" is not a usable port (ports are 1-65535)",
                "t.yaml:5:56: error: port 65536 in \"65536/tcp\" is out of range (ports are 1-65535)",
                "t.yaml:7:13: error: port range \"443-80/tcp\" is backwards: write \"80-443/tcp\"",
                "t.yaml:7:25: error: \"icmp/8\": \"icmp\" takes no port or type, write just \"icmp\"",
                "t.yaml:7:33: error: invalid port spec \"80,443/tcp\" (expected \"PORT/PROTO\", \"LOW-HIGH/PROTO\", \"tcp\", \"udp\", \"sctp\", \"icmp\", \"icmpv6\" or \"any\")",
                "t.yaml:7:47: error: invalid port spec \"1-/udp\" (expected \"PORT/PROTO\", \"LOW-HIGH/PROTO\", \"tcp\", \"udp\", \"sctp\", \"icmp\", \"icmpv6\" or \"any\")",
                "t.yaml:7:55: error: an entry of \"ports\" must be a string, found true/false: write it in quotes, \"true\"",
                "t.yaml:7:61: error: \"22/icmp\": \"icmp\" takes no port or type, write just \"icmp\"",
                "t.yaml:9:12: error: \"ports\" is empty (nothing is allowed implicitly: list ports such as \"443/tcp\", or \"any\")",
                "t.yaml:11:12: error: \"ports\" must be a list, found a string",
            ]
        );
    }

    #[test]
    fn port_specs_parse() {
        let p = |s| parse_port_spec(s);
        assert_eq!(p("22/tcp"), Ok((Protocol::Tcp, 22..=22)));
        assert_eq!(p("1-65535/udp"), Ok((Protocol::Udp, 1..=65535)));
        assert_eq!(p("5000-5000/sctp"), Ok((Protocol::Sctp, 5000..=5000)));
        assert_eq!(p("tcp"), Ok((Protocol::Tcp, PortSpec::ALL_PORTS)));
        assert_eq!(p("icmp"), Ok((Protocol::Icmp, PortSpec::ALL_PORTS)));
        assert_eq!(p("any"), Ok((Protocol::Any, PortSpec::ALL_PORTS)));
        for bad in [
            "",
            "/tcp",
            "+22/tcp",
            "22/",
            "22 /tcp",
            "22/tcp/udp",
            "99999999999/tcp",
        ] {
            assert!(p(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn target_and_source_errors() {
        assert_eq!(
            errors(
                r#"
                kind: Segment
                name: sensors
                devices:
                  - id: mqtt-broker
                allow:
                  - to: mqtt-brokr
                    ports: ["8883/tcp"]
                  - to: 10.0.0.1/8
                    ports: [tcp]
                  - to: 10.1.2.300
                    ports: [tcp]
                  - to: something-else
                    ports: [tcp]
                  - to: [gateway]
                    ports: [tcp]
                accept:
                  - from: sensors
                    ports: [tcp]
                  - from: mqtt-broker
                    ports: [tcp]
                  - from: gateway
                    ports: [tcp]
                  - from: ops-vnp
                    ports: [tcp]
                  - from: "2001:db8::1/32"
                    ports: [tcp]
                ---
                kind: Zone
                name: ops-vpn
                cidrs: ["2001:db8::/32"]
                "#
            ),
            [
                "t.yaml:6:9: error: unknown target \"mqtt-brokr\" (did you mean \"mqtt-broker\"?)",
                "t.yaml:8:9: error: 10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?",
                "t.yaml:10:9: error: invalid IP address \"10.1.2.300\"",
                "t.yaml:12:9: error: unknown target \"something-else\"",
                "t.yaml:14:9: error: \"to\" must be a string, found a list",
                "t.yaml:17:11: error: \"sensors\" is a segment; \"from:\" takes a zone or a CIDR (to let segment \"sensors\" reach these devices, give it an allow rule)",
                "t.yaml:19:11: error: \"mqtt-broker\" is a device; \"from:\" takes a zone or a CIDR (to let it reach these devices, give its segment \"sensors\" an allow rule)",
                "t.yaml:21:11: error: \"gateway\" cannot be a source; \"from:\" takes a zone or a CIDR",
                "t.yaml:23:11: error: unknown source \"ops-vnp\" (did you mean \"ops-vpn\"?); \"from:\" takes a zone or a CIDR",
                "t.yaml:25:11: error: 2001:db8::1/32 has host bits set; did you mean 2001:db8::/32?",
            ]
        );
    }

    #[test]
    fn zone_errors() {
        assert_eq!(
            errors(
                r#"
                kind: Zone
                name: a
                ---
                kind: Zone
                name: b
                cidrs: []
                ---
                kind: Zone
                name: c
                cidrs: [10.0.0.0/33, 192.168.1.1/24, not-a-cidr, 10]
                "#
            ),
            [
                "t.yaml:1:1: error: Zone is missing required key \"cidrs\"",
                "t.yaml:6:8: error: \"cidrs\" is empty: a zone needs at least one CIDR",
                "t.yaml:10:9: error: invalid CIDR \"10.0.0.0/33\" (expected e.g. \"10.0.0.0/16\")",
                "t.yaml:10:22: error: 192.168.1.1/24 has host bits set; did you mean 192.168.1.0/24?",
                "t.yaml:10:38: error: invalid IP address \"not-a-cidr\"",
                "t.yaml:10:50: error: an entry of \"cidrs\" must be a string, found a number: write it in quotes, \"10\"",
            ]
        );
        let zone =
            &valid("kind: Zone\nname: z\ncidrs: [10.1.2.3, \"fd00::1\", 0.0.0.0/0]\n").zones[0];
        let cidrs: Vec<_> = zone.cidrs.iter().map(ToString::to_string).collect();
        assert_eq!(cidrs, ["10.1.2.3/32", "fd00::1/128", "0.0.0.0/0"]);
    }

    #[test]
    fn quarantine_errors() {
        assert_eq!(
            errors(
                r#"
                kind: Segment
                name: plcs
                devices: [{id: plc-7}]
                ---
                kind: Quarantine
                allow:
                  - to: remediaton
                    ports: ["443/tcp"]
                triggers:
                  denied_flows: {count: 0, window: 10}
                  fanout: {destinations: "50", window: 0s}
                  scan: {}
                exempt: [plc-8, plcs, 7]
                ---
                kind: Quarantine
                triggers:
                  denied_flows: {count: -1, window: 10x}
                  fanout: {destinations: 4294967296, window: 99999999999999999999h}
                ---
                kind: Quarantine
                triggers:
                  denied_flows: {window: 1h}
                  fanout: []
                "#
            ),
            [
                "t.yaml:7:9: error: unknown target \"remediaton\"",
                "t.yaml:10:25: error: \"count\" must be greater than 0",
                "t.yaml:10:36: error: 10 needs a unit, e.g. \"10s\" (units: ms, s, m, h)",
                "t.yaml:11:26: error: \"destinations\" must be a whole number, found a string",
                "t.yaml:11:40: error: duration \"0s\" must be longer than 0",
                "t.yaml:12:3: error: unknown key \"scan\" in \"triggers\" (expected one of: denied_flows, fanout)",
                "t.yaml:13:10: error: unknown device \"plc-8\" in \"exempt\" (did you mean \"plc-7\"?)",
                "t.yaml:13:17: error: \"plcs\" is a segment; \"exempt\" lists device ids",
                "t.yaml:13:23: error: an entry of \"exempt\" must be a string, found a number: write it in quotes, \"7\"",
                "t.yaml:15:1: error: a policy has at most one Quarantine (the first is at t.yaml:5:1)",
                "t.yaml:17:25: error: \"count\" must be greater than 0",
                "t.yaml:17:37: error: invalid duration \"10x\" (expected a whole number and a unit: \"500ms\", \"10s\", \"2m\" or \"1h\")",
                "t.yaml:18:26: error: \"destinations\" is too large (at most 4294967295)",
                "t.yaml:18:46: error: duration \"99999999999999999999h\" is too long",
                "t.yaml:20:1: error: a policy has at most one Quarantine (the first is at t.yaml:5:1)",
                "t.yaml:22:17: error: \"denied_flows\" is missing required key \"count\"",
                "t.yaml:23:11: error: \"fanout\" must be a mapping of keys to values, found a list",
            ]
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "s", "1.5s", "-1s", "10 s", "10S", "1d", "0ms"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn yaml_syntax_errors_name_the_place() {
        assert_eq!(
            errors("kind: Zone\nname: z\ncidrs:\n\t- 10.0.0.0/8\n"),
            ["t.yaml:4:2: error: invalid YAML: tabs disallowed within this context (block indentation) (indent with spaces, not tabs)"]
        );
        // A tab-indented key continues the previous plain scalar, which is where saphyr stops.
        assert_eq!(
            errors("kind: Zone\nname: z\n\tcidrs: [10.0.0.0/8]\n"),
            ["t.yaml:2:7: error: invalid YAML: while scanning a plain scalar, found a tab (indent with spaces, not tabs)"]
        );
        assert_eq!(
            errors("kind: Zone\nname: z\nname: y\n"),
            ["t.yaml:3:1: error: invalid YAML: duplicated key in mapping"]
        );
        assert_eq!(
            errors("kind: Zone\nname: [z\n"),
            ["t.yaml:3:1: error: invalid YAML: while parsing a flow sequence, expected ',' or ']'"]
        );
        assert_eq!(
            errors("kind: Zone\ncidrs: *nowhere\n"),
            ["t.yaml:2:8: error: invalid YAML: while parsing node, found unknown anchor"]
        );
    }

    #[test]
    fn wrong_core_tags_and_custom_tags() {
        assert_eq!(
            segment_errors(
                r#"
                description: !!int abc
                mode: !custom audit
                "#
            ),
            [
                "t.yaml:3:14: error: \"description\" has an invalid value (does it have a wrong !! tag?)",
                "t.yaml:4:7: error: YAML tags such as !custom are not supported",
            ]
        );
    }

    #[test]
    fn non_utf8_is_reported_at_the_first_bad_byte() {
        let dir = tempfile::TempDir::new().unwrap();
        fs::write(dir.path().join("bad.yaml"), b"kind: Zone\nname: caf\xe9\n").unwrap();
        let bad = dir.path().join("bad.yaml").display().to_string();
        assert_eq!(
            errors_of(load_dir(dir.path())),
            [format!(
                "{bad}:2:10: error: this file is not UTF-8 text (segment files must be UTF-8 encoded)"
            )]
        );
    }

    #[test]
    fn hostile_input_does_not_crash() {
        // Deep block nesting would overflow saphyr's recursive parser: refused up front.
        let deep = format!("kind: Zone\n{}x\n", "- ".repeat(100_000));
        assert_eq!(
            errors_of(load_str(Path::new("t.yaml"), &deep)),
            ["t.yaml:2:1: error: this line is indented or nested too deeply (more than 200 columns)"]
        );
        let deep_crlf = format!("kind: Zone\r\nname: z\r\n{}x\r\n", "- ".repeat(101));
        assert_eq!(
            errors_of(load_str(Path::new("t.yaml"), &deep_crlf)),
            ["t.yaml:3:1: error: this line is indented or nested too deeply (more than 200 columns)"]
        );
        // Deep flow nesting is capped by saphyr itself.
        let flow = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(
            errors_of(load_str(Path::new("t.yaml"), &flow)),
            ["t.yaml:1:256: error: invalid YAML: recursion limit exceeded"]
        );
        // The deepest nesting the checks let through parses fine: a mapping per column, then
        // as much flow nesting as saphyr allows.
        let mut ok_deep: String = (0..MAX_LINE_LEAD)
            .map(|i| format!("{}k:\n", " ".repeat(i)))
            .collect();
        ok_deep.push_str(&format!(
            "{}v: {}{}\n",
            " ".repeat(MAX_LINE_LEAD),
            "[".repeat(254),
            "]".repeat(254)
        ));
        assert_eq!(
            errors_of(load_str(Path::new("t.yaml"), &ok_deep)),
            ["t.yaml:1:1: error: document is missing required key \"kind\" (Segment, Zone or Quarantine)"]
        );
        let ok_deep = format!("{}x\n", "- ".repeat(MAX_LINE_LEAD / 2));
        assert_eq!(
            errors_of(load_str(Path::new("t.yaml"), &ok_deep)),
            ["t.yaml:1:1: error: a document must be a mapping with a \"kind\" (Segment, Zone or Quarantine), found a list"]
        );
        // Billion laughs: saphyr's alias budget stops it.
        let mut laughs = String::from("a: &a [x, x, x, x, x, x, x, x, x, x]\n");
        for (prev, next) in ('a'..='i').zip('b'..='j') {
            let refs = vec![format!("*{prev}"); 10].join(", ");
            laughs.push_str(&format!("{next}: &{next} [{refs}]\n"));
        }
        let result = errors_of(load_str(Path::new("t.yaml"), &laughs));
        assert_eq!(result.len(), 1);
        assert!(result[0].contains("alias expansion"), "{result:?}");
        // Odd bytes and control characters.
        for text in [
            "\u{0}",
            "\u{feff}",
            "kind: Zone\r\nname: z\r\ncidrs: [10.0.0.0/8]\r\n",
            "? [a]\n: b\n",
            "{{{",
            "- - -",
            "&a [*a]",
            "%TAG ! tag:x,2000:\n--- !a b\n",
        ] {
            let _ = load_str(Path::new("t.yaml"), text);
        }
    }

    #[test]
    fn many_errors_in_one_run_sorted_across_files() {
        let a = dedent(
            r#"
            kind: Segment
            name: a
            allow:
              - to: nowhere
                ports: [80]
            "#,
        );
        let b = dedent(
            r#"
            kind: Zone
            name: a
            cidrs: [10.0.0.1/8]
            "#,
        );
        // Read b.yaml first: the zone is the first "a", the segment the duplicate. Output is
        // still sorted by file.
        let err = load_sources([
            (Path::new("b.yaml"), b.as_str()),
            (Path::new("a.yaml"), a.as_str()),
        ])
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "a.yaml:2:7: error: segment name \"a\" is already the name of a zone (defined at b.yaml:2:7); segments and zones share one namespace\n\
             a.yaml:4:9: error: unknown target \"nowhere\"\n\
             a.yaml:5:13: error: 80 needs a protocol, e.g. \"80/tcp\"\n\
             b.yaml:3:9: error: 10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?"
        );
        let err = load_sources([
            (Path::new("a.yaml"), a.as_str()),
            (Path::new("b.yaml"), b.as_str()),
        ])
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "a.yaml:4:9: error: unknown target \"nowhere\"\n\
             a.yaml:5:13: error: 80 needs a protocol, e.g. \"80/tcp\"\n\
             b.yaml:2:7: error: zone name \"a\" is already the name of a segment (defined at a.yaml:2:7); segments and zones share one namespace\n\
             b.yaml:3:9: error: 10.0.0.1/8 has host bits set; did you mean 10.0.0.0/8?"
        );
    }

    #[test]
    fn directories_are_read_recursively_in_sorted_order() {
        let dir = tempfile::TempDir::new().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("lines/line-2")).unwrap();
        fs::create_dir_all(root.join(".git")).unwrap();
        fs::write(
            root.join("zones.yml"),
            "kind: Zone\nname: ops\ncidrs: [192.0.2.0/24]\n---\nkind: Zone\nname: cloud\ncidrs: [198.51.100.0/24]\n",
        )
        .unwrap();
        fs::write(
            root.join("lines/line-2/plc.yaml"),
            "kind: Segment\nname: plc\naccept:\n  - from: ops\n    ports: [\"502/tcp\"]\n",
        )
        .unwrap();
        fs::write(
            root.join("lines/a.yaml"),
            "kind: Segment\nname: hmi\nallow:\n  - to: plc\n    ports: [\"502/tcp\"]\n",
        )
        .unwrap();
        // Not policy: other extensions and hidden entries.
        fs::write(root.join("README.md"), "not yaml").unwrap();
        fs::write(root.join(".git/broken.yaml"), "{{{").unwrap();
        fs::write(root.join(".#zones.yml"), "{{{").unwrap();

        let files = policy_files(root).unwrap();
        assert_eq!(
            files,
            [
                root.join("lines/a.yaml"),
                root.join("lines/line-2/plc.yaml"),
                root.join("zones.yml"),
            ]
        );
        let policy = load_dir(root).unwrap();
        let segments: Vec<_> = policy.segments.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(segments, ["hmi", "plc"]);
        let zones: Vec<_> = policy.zones.iter().map(|z| z.name.as_str()).collect();
        assert_eq!(zones, ["ops", "cloud"]);
        assert_eq!(
            policy.zones[1].location.file.as_path(),
            root.join("zones.yml")
        );
        assert_eq!(policy.zones[1].location.line, 5);
        assert_eq!(
            policy.segments[0].allow[0].to,
            Target::Segment("plc".into())
        );

        // Errors name files as the directory joined with their path below it.
        fs::write(
            root.join("lines/line-2/bad.yaml"),
            "kind: Zone\nname: x\ncidrs: [nope]\n",
        )
        .unwrap();
        assert_eq!(
            errors_of(load_dir(root)),
            [format!(
                "{}:3:9: error: invalid IP address \"nope\"",
                root.join("lines/line-2/bad.yaml").display()
            )]
        );
    }

    #[test]
    fn relative_directory_names_are_kept_in_locations() {
        // `segward check segments/` run from the parent directory: a relative path, with a
        // trailing slash, printed as given. Tests run in the package directory.
        let cwd = std::env::current_dir().unwrap();
        let tmp = tempfile::Builder::new()
            .prefix(".segward-load-test")
            .tempdir_in(&cwd)
            .unwrap();
        let relative = tmp.path().strip_prefix(&cwd).unwrap().join("segments/");
        fs::create_dir(&relative).unwrap();
        fs::write(
            relative.join("sensors.yaml"),
            "kind: Segment\nname: sensors\nallow:\n  - to: mqtt-brokr\n    ports: [\"8883/tcp\"]\n",
        )
        .unwrap();
        let shown = relative.join("sensors.yaml");
        assert!(shown.is_relative());
        assert_eq!(
            errors_of(load_dir(&relative)),
            [format!(
                "{}:4:9: error: unknown target \"mqtt-brokr\"",
                shown.display()
            )]
        );
    }

    #[test]
    fn unreadable_directory_is_an_io_error() {
        let dir = tempfile::TempDir::new().unwrap();
        let missing = dir.path().join("missing");
        match load_dir(&missing) {
            Err(LoadError::Io { path, source }) => {
                assert_eq!(path, missing);
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("expected an I/O error, got {other:?}"),
        }
        let err = load_dir(&missing).unwrap_err();
        let message = err.to_string();
        assert!(
            message.starts_with(&format!("cannot read {}: ", missing.display())),
            "{message}"
        );
        assert!(err.diagnostics().is_empty());
    }

    #[cfg(unix)]
    #[test]
    fn symlink_cycles_and_dangling_links() {
        let dir = tempfile::TempDir::new().unwrap();
        let root = dir.path();
        fs::create_dir(root.join("sub")).unwrap();
        fs::write(
            root.join("sub/z.yaml"),
            "kind: Zone\nname: z\ncidrs: [10.0.0.0/8]\n",
        )
        .unwrap();
        std::os::unix::fs::symlink(root, root.join("sub/loop")).unwrap();
        std::os::unix::fs::symlink(root.join("nothing"), root.join("dangling.txt")).unwrap();
        assert_eq!(load_dir(root).unwrap().zones.len(), 1);
        std::os::unix::fs::symlink(root.join("nothing"), root.join("dangling.yaml")).unwrap();
        assert!(matches!(load_dir(root), Err(LoadError::Io { .. })));
    }

    #[test]
    fn suggestions_are_close_names_only() {
        assert_eq!(
            suggest("mqtt-brokr", ["sensors", "mqtt-broker"]),
            Some("mqtt-broker")
        );
        assert_eq!(suggest("xyz", ["sensors", "mqtt-broker"]), None);
        assert_eq!(suggest("ab", ["ac", "ab-long"]), Some("ac"));
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("é", "e"), 1);
    }
}
