//! The daemon's settings file (`/etc/gleaner/client.toml` for a system install, the user's config
//! dir for a desktop one): read strictly, validated whole, merged under the command line. A bad file
//! is refused with the file, the line, the key and the reason; a reload that fails keeps what runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use gleaner::policy::{DEFAULT_STOP_AFTER_FROZEN_S, Limits, OwnerPolicy, Preset, Window};
use serde::Deserialize;
use toml::Spanned;

/// The documented example, installed as `/etc/gleaner/client.toml` (`gleaner config example`).
pub const EXAMPLE: &str = include_str!("../../installers/config/client.toml");

/// Why settings were refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read the settings file: {reason}", file.display())]
    Read { file: PathBuf, reason: String },
    /// A value is wrong: where (file and line, or the command line), which key, why.
    #[error("{}{}: {key}: {reason}", where_.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid {
        where_: PathBuf,
        line: Option<usize>,
        key: String,
        reason: String,
    },
}

/// A number, or a string such as "50%" or "4GiB".
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Number(f64),
    Text(String),
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Scalar, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a number or a string such as \"50%\", \"4GiB\" or \"5m\"")
            }
            fn visit_i64<E>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Number(v as f64))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar::Number(v as f64))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar::Number(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Text(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

/// Limits while the owner uses the machine: "freeze", or a table of cores and memory.
#[derive(Debug, Clone, PartialEq)]
pub enum Present {
    Word(String),
    Limits(PresentLimits),
}

impl<'de> Deserialize<'de> for Present {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Present, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Present;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"freeze\" or a table such as { cores = 1, memory = \"25%\" }")
            }
            fn visit_str<E>(self, v: &str) -> Result<Present, E> {
                Ok(Present::Word(v.to_owned()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Present, A::Error> {
                PresentLimits::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(Present::Limits)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresentLimits {
    pub cores: Option<Spanned<Scalar>>,
    pub memory: Option<Spanned<Scalar>>,
}

/// One weekly window: `{ days = "mon-fri", from = "19:00", to = "07:00" }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowSpec {
    pub days: Spanned<String>,
    pub from: Spanned<String>,
    pub to: Spanned<String>,
}

/// The file as written. Every key is optional; the keys are `gleaner daemon`'s long options with
/// `_` for `-`, plus the owner-policy keys that have no option.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub state_dir: Option<PathBuf>,
    pub socket: Option<PathBuf>,
    pub space: Option<Spanned<String>>,
    pub machine_types: Option<PathBuf>,
    /// Signed machine types fetched from https:// URLs (`crate::type_urls`).
    pub type_urls: Option<Spanned<Vec<String>>>,
    pub type_url_every: Option<Spanned<Scalar>>,
    pub trust: Option<Spanned<Vec<String>>>,
    pub coordinator: Option<Spanned<String>>,
    pub coordinator_fingerprint: Option<Spanned<String>>,
    pub enrol: Option<Spanned<String>>,
    pub stop_grace: Option<Spanned<Scalar>>,
    pub display: Option<String>,
    pub idle_sources: Option<Spanned<Vec<String>>>,
    /// Which engines may run machines: "docker" (containers), "libvirt" (VMs).
    pub backends: Option<Spanned<Vec<String>>>,
    pub listen: Option<Spanned<Vec<String>>>,
    pub bootstrap: Option<Spanned<Vec<String>>>,
    pub no_mdns: Option<bool>,
    pub no_space: Option<bool>,
    // The owner policy.
    pub preset: Option<Spanned<String>>,
    pub cores: Option<Spanned<Scalar>>,
    pub memory: Option<Spanned<Scalar>>,
    pub cpu_usage: Option<Spanned<Scalar>>,
    pub disk: Option<Spanned<Scalar>>,
    pub max_machines: Option<Spanned<i64>>,
    pub idle_after: Option<Spanned<Scalar>>,
    pub run_on_battery: Option<bool>,
    pub suspend_above_load: Option<Spanned<Scalar>>,
    pub exclusive_apps: Option<Vec<String>>,
    pub stop_after_frozen: Option<Spanned<Scalar>>,
    pub present: Option<Spanned<Present>>,
    pub schedule: Option<Vec<WindowSpec>>,
    /// A cluster node: yield to the site's batch system (see `crate::batch`).
    pub batch: Option<Spanned<crate::batch::BatchFile>>,
    /// The control API beyond the Unix socket.
    pub control: Option<Spanned<ControlFile>>,
}

/// The `[control]` table: `tcp = "127.0.0.1:7878"` also serves the control API on loopback TCP.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlFile {
    pub tcp: Option<Spanned<String>>,
}

/// A control TCP address: `host:port` on loopback only (the API has no TLS; the token travels in
/// the clear, which only this machine may see).
pub fn control_tcp(s: &str) -> Result<std::net::SocketAddr, String> {
    let addr: std::net::SocketAddr = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an address with a port, such as \"127.0.0.1:7878\""))?;
    if !addr.ip().is_loopback() {
        return Err(format!(
            "{addr} is not a loopback address: the control API over TCP is for this machine \
             only (127.0.0.1 or [::1]); reach it from elsewhere through an SSH tunnel"
        ));
    }
    if addr.port() == 0 {
        return Err("give a port: callers must know where to connect".into());
    }
    Ok(addr)
}

/// The host's size, which percentages refer to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostSize {
    pub cores: f64,
    pub memory_bytes: u64,
}

impl HostSize {
    /// This machine, from the kernel.
    pub fn here() -> HostSize {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get() as f64)
            .unwrap_or(1.0);
        let memory_bytes = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .map(|kib| kib * 1024)
            .unwrap_or(2 << 30);
        HostSize {
            cores,
            memory_bytes,
        }
    }
}

/// Where a value came from, for error messages.
#[derive(Debug, Clone)]
pub struct Origin<'a> {
    pub file: &'a Path,
    pub text: &'a str,
}

impl Origin<'_> {
    fn line(&self, span: std::ops::Range<usize>) -> Option<usize> {
        let start = span.start.min(self.text.len());
        Some(self.text[..start].bytes().filter(|b| *b == b'\n').count() + 1)
    }

    /// An error about `key` at `span`.
    pub fn invalid(
        &self,
        key: &str,
        span: std::ops::Range<usize>,
        reason: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            where_: self.file.to_owned(),
            line: self.line(span),
            key: key.to_owned(),
            reason: reason.into(),
        }
    }
}

/// An error about a command-line option.
pub fn invalid_option(option: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        where_: PathBuf::from("command line"),
        line: None,
        key: option.to_owned(),
        reason: reason.into(),
    }
}

/// The keys the owner may change live (`gleaner limits --set`, the GUI): the owner policy.
pub const LIVE_KEYS: [&str; 12] = [
    "preset",
    "cores",
    "memory",
    "cpu_usage",
    "max_machines",
    "idle_after",
    "run_on_battery",
    "suspend_above_load",
    "exclusive_apps",
    "stop_after_frozen",
    "present",
    "schedule",
];

/// An error about `key` in `file`, without a line.
pub fn invalid_at(file: &Path, key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        where_: file.to_owned(),
        line: None,
        key: key.to_owned(),
        reason: reason.into(),
    }
}

/// Refuses keys of the owner's overrides file that are not owner policy.
pub fn check_live_keys(file: &Path, text: &str) -> Result<(), ConfigError> {
    let table = text
        .parse::<toml::Table>()
        .map_err(|e| invalid_at(file, "(syntax)", e.to_string()))?;
    for k in table.keys() {
        if !LIVE_KEYS.contains(&k.as_str()) {
            return Err(invalid_at(
                file,
                k,
                format!(
                    "only the owner policy can be changed here ({}); set {k} in the settings file",
                    LIVE_KEYS.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// Parses `text` (the contents of `file`) strictly: unknown keys and wrong types are refused with
/// the key's path and line.
pub fn parse(file: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    let origin = Origin { file, text };
    let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::Invalid {
        where_: file.to_owned(),
        line: e.span().and_then(|s| origin.line(s)),
        key: "(syntax)".into(),
        reason: e.message().trim().to_owned(),
    })?;
    serde_path_to_error::deserialize::<_, FileConfig>(de).map_err(|e| {
        let key = e
            .path()
            .to_string()
            .replace(".$__serde_spanned_private_value", "");
        let inner = e.into_inner();
        ConfigError::Invalid {
            where_: file.to_owned(),
            line: inner.span().and_then(|s| origin.line(s)),
            key: if key == "." {
                "(top level)".into()
            } else {
                key
            },
            reason: inner.message().trim().to_owned(),
        }
    })
}

/// Reads and parses a settings file.
pub fn read(file: &Path) -> Result<(FileConfig, String), ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|e| ConfigError::Read {
        file: file.to_owned(),
        reason: e.to_string(),
    })?;
    Ok((parse(file, &text)?, text))
}

/// The settings file used when `--config` is not given: `/etc/gleaner/client.toml` as root, else
/// the user's config dir (`~/.config/gleaner/client.toml`).
pub fn default_path() -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let root = std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false);
    if root {
        return PathBuf::from("/etc/gleaner/client.toml");
    }
    directories::ProjectDirs::from("org", "gleaner", "gleaner")
        .map(|d| d.config_dir().join("client.toml"))
        .unwrap_or_else(|| PathBuf::from("/etc/gleaner/client.toml"))
}

/// A share of the host: a count, or "N%" of `whole`.
pub fn amount(s: &Scalar, whole: f64, unit: &str) -> Result<f64, String> {
    match s {
        Scalar::Number(n) => Ok(*n),
        Scalar::Text(t) => match t.trim().strip_suffix('%') {
            Some(p) => p
                .trim()
                .parse::<f64>()
                .map(|p| whole * p / 100.0)
                .map_err(|_| format!("{t:?} is not a percentage like \"50%\"")),
            None => t.trim().parse::<f64>().map_err(|_| {
                format!("{t:?} is not a number of {unit} or a percentage like \"50%\"")
            }),
        },
    }
}

/// Cores: a count (fractions allowed: a CPU quota), taken as given — more than the host has
/// overcommits, the machines then share its cores — or "N%" of the host's, at most 100 %.
pub fn cores(s: &Scalar, host: f64) -> Result<f64, String> {
    let c = amount(s, host, "cores")?;
    if !c.is_finite() || c < 0.1 {
        return Err(format!("{c} cores is too few: give at least 0.1"));
    }
    match s {
        Scalar::Text(t) if t.trim().ends_with('%') => Ok(c.min(host)),
        _ => Ok(c),
    }
}

/// A size: "4GiB", "512MiB" or "N%" of `whole`; capped at `whole`.
pub fn size(s: &Scalar, whole: u64) -> Result<u64, String> {
    let bytes = match s {
        Scalar::Number(n) => {
            return Err(format!(
                "{n} has no unit: write a size like \"4GiB\" or a percentage like \"50%\""
            ));
        }
        Scalar::Text(t) if t.trim().ends_with('%') => amount(s, whole as f64, "bytes")? as u64,
        Scalar::Text(t) => t
            .trim()
            .parse::<bytesize::ByteSize>()
            .map_err(|_| format!("{t:?} is not a size like \"4GiB\" or a percentage like \"50%\""))?
            .as_u64(),
    };
    if bytes < 64 << 20 {
        return Err(format!("{bytes} bytes is too little: give at least 64MiB"));
    }
    Ok(bytes.min(whole))
}

/// A duration: seconds as a number, or "30s", "5m", "4h".
pub fn duration(s: &Scalar) -> Result<Duration, String> {
    match s {
        Scalar::Number(n) if n.is_finite() && *n >= 0.0 => Ok(Duration::from_secs_f64(*n)),
        Scalar::Number(n) => Err(format!("{n} is not a number of seconds")),
        Scalar::Text(t) => humantime::parse_duration(t.trim())
            .map_err(|e| format!("{t:?} is not a duration like \"30s\", \"5m\" or \"4h\": {e}")),
    }
}

/// Days of the week as a bit set (bit 0 = Monday): "mon-fri", "sat,sun", "weekdays", "weekends",
/// "daily".
pub fn days(s: &str) -> Result<u8, String> {
    const NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    let day = |d: &str| -> Result<u8, String> {
        let d = d.trim().to_ascii_lowercase();
        NAMES
            .iter()
            .position(|n| d.starts_with(n) && n.len() >= 3)
            .map(|i| i as u8)
            .ok_or_else(|| format!("{d:?} is not a day (mon, tue, wed, thu, fri, sat, sun)"))
    };
    let mut bits = 0u8;
    for part in s.split(',') {
        let part = part.trim().to_ascii_lowercase();
        bits |= match part.as_str() {
            "weekdays" => 0b001_1111,
            "weekends" => 0b110_0000,
            "daily" | "every day" | "all" => 0b111_1111,
            p => match p.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (day(a)?, day(b)?);
                    let mut m = 0u8;
                    let mut d = a;
                    loop {
                        m |= 1 << d;
                        if d == b {
                            break;
                        }
                        d = (d + 1) % 7;
                    }
                    m
                }
                None => 1 << day(p)?,
            },
        };
    }
    if bits == 0 {
        return Err("no days given".into());
    }
    Ok(bits)
}

/// A time of day "HH:MM" (24:00 allowed as the end of the day) as minutes.
pub fn time_of_day(s: &str) -> Result<u16, String> {
    let bad = || format!("{s:?} is not a time like \"19:00\"");
    let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
    let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if m > 59 || h > 24 || (h == 24 && m != 0) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

/// The owner's policy from the file, over the preset, within the host's size. `cli` holds the
/// command line's overrides, which win over the file.
pub fn owner_policy(
    f: &FileConfig,
    o: &Origin,
    cli: &PolicyOverrides,
    host: HostSize,
) -> Result<(OwnerPolicy, Preset), ConfigError> {
    let preset = match (&cli.preset, &f.preset) {
        (Some(p), _) => *p,
        (None, Some(p)) => p
            .get_ref()
            .parse::<Preset>()
            .map_err(|e| o.invalid("preset", p.span(), e))?,
        (None, None) => Preset::OnlyWhenIdle,
    };
    let mut p = preset.policy(host.cores, host.memory_bytes);
    let away_cores = match (&cli.cores, &f.cores) {
        (Some(c), _) => {
            cores(&Scalar::Text(c.clone()), host.cores).map_err(|e| invalid_option("--cores", e))?
        }
        (None, Some(c)) => {
            cores(c.get_ref(), host.cores).map_err(|e| o.invalid("cores", c.span(), e))?
        }
        (None, None) => host.cores,
    };
    let usage = match &f.cpu_usage {
        Some(u) => {
            let pct = amount(u.get_ref(), 100.0, "percent").and_then(|v| {
                if v > 0.0 && v <= 100.0 {
                    Ok(v)
                } else {
                    Err(format!("{v}% is not between 0 and 100"))
                }
            });
            pct.map_err(|e| o.invalid("cpu_usage", u.span(), e))? / 100.0
        }
        None => 1.0,
    };
    let memory = match (&cli.memory, &f.memory) {
        (Some(m), _) => size(&Scalar::Text(m.clone()), host.memory_bytes)
            .map_err(|e| invalid_option("--memory", e))?,
        (None, Some(m)) => {
            size(m.get_ref(), host.memory_bytes).map_err(|e| o.invalid("memory", m.span(), e))?
        }
        (None, None) => host.memory_bytes / 2,
    };
    p.away = Limits {
        cores: (away_cores * usage).max(0.1),
        memory_bytes: memory,
    };
    let cap = |l: Limits| Limits {
        cores: l.cores.min(p.away.cores),
        memory_bytes: l.memory_bytes.min(p.away.memory_bytes),
    };
    p.present = match &f.present {
        None => p.present.map(cap),
        Some(s) => match s.get_ref() {
            Present::Word(w) if w == "freeze" => None,
            Present::Word(w) => {
                return Err(o.invalid(
                    "present",
                    s.span(),
                    format!("{w:?}: write \"freeze\" or a table {{ cores = 1, memory = \"25%\" }}"),
                ));
            }
            Present::Limits(l) => {
                let c = match &l.cores {
                    Some(c) => cores(c.get_ref(), host.cores)
                        .map_err(|e| o.invalid("present.cores", c.span(), e))?,
                    None => 1.0,
                };
                let m = match &l.memory {
                    Some(m) => size(m.get_ref(), host.memory_bytes)
                        .map_err(|e| o.invalid("present.memory", m.span(), e))?,
                    None => host.memory_bytes / 4,
                };
                Some(cap(Limits {
                    cores: c * usage,
                    memory_bytes: m,
                }))
            }
        },
    };
    p.max_machines = match &f.max_machines {
        Some(m) if *m.get_ref() >= 1 => *m.get_ref() as usize,
        Some(m) => {
            return Err(o.invalid(
                "max_machines",
                m.span(),
                format!("{} machines: give at least 1", m.get_ref()),
            ));
        }
        None => (away_cores.floor() as usize).max(1),
    };
    match (&cli.idle_after, &f.idle_after) {
        (Some(i), _) => {
            p.idle_after_s = duration(&Scalar::Text(i.clone()))
                .map_err(|e| invalid_option("--idle-after", e))?
                .as_secs();
        }
        (None, Some(i)) => {
            p.idle_after_s = duration(i.get_ref())
                .map_err(|e| o.invalid("idle_after", i.span(), e))?
                .as_secs();
        }
        (None, None) => {}
    }
    p.run_on_battery = cli.run_on_battery || f.run_on_battery.unwrap_or(p.run_on_battery);
    if let Some(l) = &cli.suspend_above_load {
        p.suspend_above_load = match l.as_str() {
            "off" | "never" => None,
            t => Some(
                amount(&Scalar::Text(t.to_owned()), host.cores, "cores")
                    .ok()
                    .filter(|v| *v > 0.0)
                    .ok_or_else(|| {
                        invalid_option(
                            "--suspend-above-load",
                            format!("{t:?}: give a load above 0 (cores, or a percentage), or off"),
                        )
                    })?,
            ),
        };
    } else if let Some(l) = &f.suspend_above_load {
        p.suspend_above_load = match l.get_ref() {
            Scalar::Text(t) if t == "off" || t == "never" => None,
            s => {
                let v = amount(s, host.cores, "cores")
                    .map_err(|e| o.invalid("suspend_above_load", l.span(), e))?;
                if v.is_nan() || v <= 0.0 {
                    return Err(o.invalid(
                        "suspend_above_load",
                        l.span(),
                        "give a load above 0 (cores, or a percentage of them), or \"off\"",
                    ));
                }
                Some(v)
            }
        };
    }
    if let Some(apps) = &f.exclusive_apps {
        p.exclusive_apps = apps
            .iter()
            .map(|a| a.trim().to_owned())
            .filter(|a| !a.is_empty())
            .collect();
    }
    if let Some(s) = &f.stop_after_frozen {
        p.stop_after_frozen_s = match s.get_ref() {
            Scalar::Text(t) if t == "never" => None,
            v => Some(
                duration(v)
                    .map_err(|e| o.invalid("stop_after_frozen", s.span(), e))?
                    .as_secs()
                    .max(1),
            ),
        };
    } else if p.stop_after_frozen_s.is_none() {
        p.stop_after_frozen_s = Some(DEFAULT_STOP_AFTER_FROZEN_S);
    }
    if let Some(ws) = &f.schedule {
        let mut windows = Vec::new();
        for (i, w) in ws.iter().enumerate() {
            let key = |k: &str| format!("schedule[{i}].{k}");
            windows.push(Window {
                days: days(w.days.get_ref())
                    .map_err(|e| o.invalid(&key("days"), w.days.span(), e))?,
                start_min: time_of_day(w.from.get_ref())
                    .map_err(|e| o.invalid(&key("from"), w.from.span(), e))?,
                end_min: time_of_day(w.to.get_ref())
                    .map_err(|e| o.invalid(&key("to"), w.to.span(), e))?,
            });
        }
        p.schedule = windows;
    }
    Ok((p, preset))
}

/// The policy options the command line may give (they win over the file).
#[derive(Debug, Clone, Default)]
pub struct PolicyOverrides {
    pub preset: Option<Preset>,
    pub cores: Option<String>,
    pub memory: Option<String>,
    pub idle_after: Option<String>,
    pub run_on_battery: bool,
    pub suspend_above_load: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const HOST: HostSize = HostSize {
        cores: 8.0,
        memory_bytes: 16 * GIB,
    };

    fn policy(text: &str) -> Result<OwnerPolicy, ConfigError> {
        let file = Path::new("/etc/gleaner/client.toml");
        let f = parse(file, text)?;
        owner_policy(
            &f,
            &Origin { file, text },
            &PolicyOverrides::default(),
            HOST,
        )
        .map(|(p, _)| p)
    }

    fn err(text: &str) -> String {
        policy(text).unwrap_err().to_string()
    }

    #[test]
    fn the_installed_example_is_valid_and_gives_the_defaults() {
        let p = policy(EXAMPLE).unwrap();
        assert_eq!(p, policy("").unwrap());
        assert_eq!(p.away.cores, 8.0);
        assert_eq!(p.away.memory_bytes, 8 * GIB);
        assert_eq!(p.present, None);
        assert_eq!(p.idle_after_s, 300);
    }

    #[test]
    fn a_full_policy() {
        let p = policy(
            r#"
preset = "always-gently"
cores = "50%"
cpu_usage = "50%"
memory = "4GiB"
max_machines = 2
idle_after = "90s"
run_on_battery = true
suspend_above_load = 3
exclusive_apps = ["blender", "steam"]
stop_after_frozen = "never"
present = { cores = 2, memory = "10%" }
schedule = [
  { days = "mon-fri", from = "19:00", to = "07:00" },
  { days = "weekends", from = "00:00", to = "24:00" },
]
"#,
        )
        .unwrap();
        assert_eq!(p.away.cores, 2.0, "half the cores at half usage");
        assert_eq!(p.away.memory_bytes, 4 * GIB);
        let present = p.present.unwrap();
        assert_eq!(present.cores, 1.0);
        assert_eq!(present.memory_bytes, (16 * GIB) / 10);
        assert_eq!(p.max_machines, 2);
        assert_eq!(p.idle_after_s, 90);
        assert!(p.run_on_battery);
        assert_eq!(p.suspend_above_load, Some(3.0));
        assert_eq!(p.exclusive_apps, ["blender", "steam"]);
        assert_eq!(p.stop_after_frozen_s, None);
        assert_eq!(p.schedule.len(), 2);
        assert_eq!(p.schedule[0].days, 0b001_1111);
        assert_eq!(p.schedule[0].start_min, 19 * 60);
        assert_eq!(p.schedule[1].end_min, 24 * 60);
    }

    #[test]
    fn more_memory_than_the_host_is_capped_and_a_core_count_is_taken_as_given() {
        let p = policy("cores = 12\nmemory = \"1TiB\"").unwrap();
        assert_eq!(p.away.cores, 12.0, "an explicit count may overcommit");
        assert_eq!(p.away.memory_bytes, 16 * GIB);
        let p = policy("cores = \"150%\"").unwrap();
        assert_eq!(
            p.away.cores, 8.0,
            "a percentage is of this host, at most all of it"
        );
    }

    #[test]
    fn bad_files_say_the_file_the_line_the_key_and_why() {
        let cases: &[(&str, &str)] = &[
            (
                "\n\ncores = \"lots\"",
                "/etc/gleaner/client.toml:3: cores: \"lots\" is not a number of cores",
            ),
            ("memory = 4", "client.toml:1: memory: 4 has no unit"),
            ("cpus = 4", "unknown field `cpus`"),
            (
                "run_on_battery = \"yes\"",
                ":1: run_on_battery: invalid type",
            ),
            (
                "preset = \"sometimes\"",
                ":1: preset: \"sometimes\" is not a preset",
            ),
            (
                "idle_after = \"soon\"",
                ":1: idle_after: \"soon\" is not a duration",
            ),
            (
                "cpu_usage = \"150%\"",
                "cpu_usage: 150% is not between 0 and 100",
            ),
            ("max_machines = 0", "max_machines: 0 machines"),
            (
                "present = \"maybe\"",
                "present: \"maybe\": write \"freeze\"",
            ),
            ("present = { cores = 1, gpu = 1 }", "present"),
            (
                "schedule = [{ days = \"someday\", from = \"19:00\", to = \"07:00\" }]",
                "schedule[0].days: \"someday\" is not a day",
            ),
            (
                "schedule = [{ days = \"mon\", from = \"25:00\", to = \"07:00\" }]",
                "schedule[0].from: \"25:00\" is not a time",
            ),
            ("cores = [", ":1: (syntax)"),
            (
                "suspend_above_load = 0",
                "suspend_above_load: give a load above 0",
            ),
        ];
        for (text, want) in cases {
            let got = err(text);
            assert!(got.contains(want), "{text:?}: got {got:?}, want {want:?}");
            assert!(got.starts_with("/etc/gleaner/client.toml"), "{got}");
        }
    }

    #[test]
    fn the_command_line_wins_over_the_file() {
        let text = "cores = 2\nidle_after = \"10m\"\npreset = \"always-gently\"";
        let file = Path::new("f.toml");
        let f = parse(file, text).unwrap();
        let cli = PolicyOverrides {
            preset: Some(Preset::OnlyWhenIdle),
            cores: Some("3".into()),
            idle_after: Some("30s".into()),
            ..PolicyOverrides::default()
        };
        let (p, preset) = owner_policy(&f, &Origin { file, text }, &cli, HOST).unwrap();
        assert_eq!(preset, Preset::OnlyWhenIdle);
        assert_eq!(p.away.cores, 3.0);
        assert_eq!(p.idle_after_s, 30);
        let bad = PolicyOverrides {
            memory: Some("lots".into()),
            ..PolicyOverrides::default()
        };
        let e = owner_policy(&f, &Origin { file, text }, &bad, HOST)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("command line: --memory"), "{e}");
    }

    #[test]
    fn days_and_times() {
        assert_eq!(days("mon-fri").unwrap(), 0b001_1111);
        assert_eq!(days("fri-mon").unwrap(), 0b111_0001);
        assert_eq!(days("sat,sun").unwrap(), 0b110_0000);
        assert_eq!(days("Monday").unwrap(), 1);
        assert!(days("").is_err());
        assert_eq!(time_of_day("07:30").unwrap(), 450);
        assert!(time_of_day("7").is_err());
        assert!(time_of_day("24:01").is_err());
    }
}
