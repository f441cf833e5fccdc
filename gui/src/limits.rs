//! The owner-policy form: text fields as the owner types them, validated on every edit by the same
//! parser the daemon's settings file goes through (so the form refuses exactly what the daemon
//! would), and turned into a `Limits { set }` object of settings-file keys.

use std::path::Path;

use gleaner::policy::Preset;
use gleaner_client::config::{self, ConfigError, HostSize, Origin, PolicyOverrides};
use serde_json::{Map, Value, json};

use crate::status::{Policy, bytes_words};

/// The fields of the form, in settings-file terms (`cores`, `memory`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Field {
    Cores,
    CpuUsage,
    Memory,
    IdleAfter,
    PresentCores,
    PresentMemory,
    MaxMachines,
    SuspendAboveLoad,
    StopAfterFrozen,
    ExclusiveApps,
    ScheduleDays(usize),
    ScheduleFrom(usize),
    ScheduleTo(usize),
}

impl Field {
    /// The settings-file key that an error about this field names.
    pub fn key(self) -> String {
        match self {
            Field::Cores => "cores".into(),
            Field::CpuUsage => "cpu_usage".into(),
            Field::Memory => "memory".into(),
            Field::IdleAfter => "idle_after".into(),
            Field::PresentCores => "present.cores".into(),
            Field::PresentMemory => "present.memory".into(),
            Field::MaxMachines => "max_machines".into(),
            Field::SuspendAboveLoad => "suspend_above_load".into(),
            Field::StopAfterFrozen => "stop_after_frozen".into(),
            Field::ExclusiveApps => "exclusive_apps".into(),
            Field::ScheduleDays(i) => format!("schedule[{i}].days"),
            Field::ScheduleFrom(i) => format!("schedule[{i}].from"),
            Field::ScheduleTo(i) => format!("schedule[{i}].to"),
        }
    }

    /// A short name for widget ids and tests.
    pub fn id(self) -> String {
        format!("limits-{}", self.key())
    }
}

/// One schedule window as typed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WindowForm {
    pub days: String,
    pub from: String,
    pub to: String,
}

/// The owner policy as the owner is editing it.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitsForm {
    /// A preset the detailed fields start from (`None`: only the fields).
    pub preset: Option<Preset>,
    pub cores: String,
    pub cpu_usage: String,
    pub memory: String,
    pub idle_after: String,
    pub run_on_battery: bool,
    /// Work while the owner is present within limits (else frozen).
    pub present_runs: bool,
    pub present_cores: String,
    pub present_memory: String,
    pub max_machines: String,
    pub suspend_above_load: String,
    pub stop_after_frozen: String,
    pub exclusive_apps: String,
    pub schedule: Vec<WindowForm>,
    pub host: HostSize,
}

/// Why the form is refused: the field (when one is to blame) and the reason.
#[derive(Debug, Clone, PartialEq)]
pub struct FormError {
    pub field: Option<Field>,
    pub key: String,
    pub reason: String,
}

impl std::fmt::Display for FormError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

fn all_fields(windows: usize) -> Vec<Field> {
    let mut v = vec![
        Field::Cores,
        Field::CpuUsage,
        Field::Memory,
        Field::IdleAfter,
        Field::PresentCores,
        Field::PresentMemory,
        Field::MaxMachines,
        Field::SuspendAboveLoad,
        Field::StopAfterFrozen,
        Field::ExclusiveApps,
    ];
    for i in 0..windows {
        v.extend([
            Field::ScheduleDays(i),
            Field::ScheduleFrom(i),
            Field::ScheduleTo(i),
        ]);
    }
    v
}

/// A number stays a number (the file's `cores = 2`); anything else is a string ("50%", "4GiB").
fn scalar(s: &str) -> Value {
    let t = s.trim();
    match t.parse::<i64>() {
        Ok(n) => json!(n),
        Err(_) => match t.parse::<f64>() {
            Ok(f) if f.is_finite() => json!(f),
            _ => json!(t),
        },
    }
}

fn minutes_hhmm(m: u16) -> String {
    format!("{:02}:{:02}", m / 60, m % 60)
}

fn days_words(bits: u8) -> String {
    const NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
    match bits & 0x7f {
        0b111_1111 => "daily".into(),
        0b001_1111 => "mon-fri".into(),
        0b110_0000 => "weekends".into(),
        b => (0..7)
            .filter(|i| b & (1 << i) != 0)
            .map(|i| NAMES[i])
            .collect::<Vec<_>>()
            .join(","),
    }
}

/// A size as the form shows it: whole GiB or MiB.
fn size_text(b: u64) -> String {
    if b >= 1 << 30 && b % (1 << 30) == 0 {
        format!("{}GiB", b >> 30)
    } else {
        format!("{}MiB", b >> 20)
    }
}

fn secs_text(s: u64) -> String {
    if s > 0 && s % 3600 == 0 {
        format!("{}h", s / 3600)
    } else if s > 0 && s % 60 == 0 {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

fn num_text(f: f64) -> String {
    if f.fract() == 0.0 {
        format!("{f:.0}")
    } else {
        format!("{f}")
    }
}

impl LimitsForm {
    /// The form filled with the policy in force.
    pub fn from_policy(p: &Policy, host: HostSize) -> LimitsForm {
        LimitsForm {
            preset: None,
            cores: num_text(p.away.cores),
            cpu_usage: String::new(),
            memory: size_text(p.away.memory_bytes),
            idle_after: secs_text(p.idle_after_s),
            run_on_battery: p.run_on_battery,
            present_runs: p.present.is_some(),
            present_cores: p
                .present
                .as_ref()
                .map(|l| num_text(l.cores))
                .unwrap_or_default(),
            present_memory: p
                .present
                .as_ref()
                .map(|l| size_text(l.memory_bytes))
                .unwrap_or_default(),
            max_machines: p.max_machines.to_string(),
            suspend_above_load: p
                .suspend_above_load
                .map(num_text)
                .unwrap_or_else(|| "off".into()),
            stop_after_frozen: p
                .stop_after_frozen_s
                .map(secs_text)
                .unwrap_or_else(|| "never".into()),
            exclusive_apps: p.exclusive_apps.join(", "),
            schedule: p
                .schedule
                .iter()
                .map(|w| WindowForm {
                    days: days_words(w.days),
                    from: minutes_hhmm(w.start_min),
                    to: minutes_hhmm(w.end_min),
                })
                .collect(),
            host,
        }
    }

    /// The form reset to a preset's policy on this host.
    pub fn from_preset(preset: Preset, host: HostSize) -> LimitsForm {
        let p = preset.policy(host.cores, host.memory_bytes);
        // The same conversion the daemon answers `limits` with.
        let policy = Policy::from(&p);
        let mut f = LimitsForm::from_policy(&policy, host);
        f.preset = Some(preset);
        f
    }

    /// The text of a field.
    pub fn get(&self, field: Field) -> &str {
        match field {
            Field::Cores => &self.cores,
            Field::CpuUsage => &self.cpu_usage,
            Field::Memory => &self.memory,
            Field::IdleAfter => &self.idle_after,
            Field::PresentCores => &self.present_cores,
            Field::PresentMemory => &self.present_memory,
            Field::MaxMachines => &self.max_machines,
            Field::SuspendAboveLoad => &self.suspend_above_load,
            Field::StopAfterFrozen => &self.stop_after_frozen,
            Field::ExclusiveApps => &self.exclusive_apps,
            Field::ScheduleDays(i) => self.schedule.get(i).map_or("", |w| &w.days),
            Field::ScheduleFrom(i) => self.schedule.get(i).map_or("", |w| &w.from),
            Field::ScheduleTo(i) => self.schedule.get(i).map_or("", |w| &w.to),
        }
    }

    /// Sets a field's text.
    pub fn set(&mut self, field: Field, text: String) {
        let slot = match field {
            Field::Cores => &mut self.cores,
            Field::CpuUsage => &mut self.cpu_usage,
            Field::Memory => &mut self.memory,
            Field::IdleAfter => &mut self.idle_after,
            Field::PresentCores => &mut self.present_cores,
            Field::PresentMemory => &mut self.present_memory,
            Field::MaxMachines => &mut self.max_machines,
            Field::SuspendAboveLoad => &mut self.suspend_above_load,
            Field::StopAfterFrozen => &mut self.stop_after_frozen,
            Field::ExclusiveApps => &mut self.exclusive_apps,
            Field::ScheduleDays(i) | Field::ScheduleFrom(i) | Field::ScheduleTo(i) => {
                let Some(w) = self.schedule.get_mut(i) else {
                    return;
                };
                match field {
                    Field::ScheduleDays(_) => &mut w.days,
                    Field::ScheduleFrom(_) => &mut w.from,
                    _ => &mut w.to,
                }
            }
        };
        *slot = text;
    }

    /// The `Limits { set }` object: settings-file keys; an empty field is `null` (no override).
    pub fn to_set(&self) -> Value {
        let mut m = Map::new();
        let mut put = |key: &str, text: &str| {
            let v = if text.trim().is_empty() {
                Value::Null
            } else {
                scalar(text)
            };
            m.insert(key.to_owned(), v);
        };
        put("cores", &self.cores);
        put("cpu_usage", &self.cpu_usage);
        put("memory", &self.memory);
        put("idle_after", &self.idle_after);
        put("suspend_above_load", &self.suspend_above_load);
        put("stop_after_frozen", &self.stop_after_frozen);
        let max = self.max_machines.trim();
        m.insert(
            "max_machines".into(),
            match max.parse::<i64>() {
                Ok(n) => json!(n),
                Err(_) if max.is_empty() => Value::Null,
                Err(_) => json!(max),
            },
        );
        m.insert("run_on_battery".into(), json!(self.run_on_battery));
        m.insert(
            "preset".into(),
            self.preset.map_or(Value::Null, |p| json!(p.name())),
        );
        let present = if self.present_runs {
            let mut p = Map::new();
            if !self.present_cores.trim().is_empty() {
                p.insert("cores".into(), scalar(&self.present_cores));
            }
            if !self.present_memory.trim().is_empty() {
                p.insert("memory".into(), scalar(&self.present_memory));
            }
            Value::Object(p)
        } else {
            json!("freeze")
        };
        m.insert("present".into(), present);
        let apps: Vec<String> = self
            .exclusive_apps
            .split(',')
            .map(|a| a.trim().to_owned())
            .filter(|a| !a.is_empty())
            .collect();
        m.insert("exclusive_apps".into(), json!(apps));
        m.insert(
            "schedule".into(),
            Value::Array(
                self.schedule
                    .iter()
                    .map(|w| json!({"days": w.days.trim(), "from": w.from.trim(), "to": w.to.trim()}))
                    .collect(),
            ),
        );
        Value::Object(m)
    }

    /// Validates the whole form as the daemon would validate a settings file with these keys.
    /// `Ok` carries a one-line summary of the resulting policy.
    pub fn validate(&self) -> Result<String, FormError> {
        let set = self.to_set();
        let mut table = toml::Table::new();
        for (k, v) in set.as_object().into_iter().flatten() {
            if v.is_null() {
                continue;
            }
            let tv = json_to_toml(v).ok_or_else(|| FormError {
                field: None,
                key: k.clone(),
                reason: "cannot be written in the settings file".into(),
            })?;
            table.insert(k.clone(), tv);
        }
        let text = toml::to_string(&table).map_err(|e| FormError {
            field: None,
            key: "(form)".into(),
            reason: e.to_string(),
        })?;
        let file = Path::new("the form");
        let err = |e: ConfigError| match e {
            ConfigError::Invalid { key, reason, .. } => FormError {
                field: all_fields(self.schedule.len())
                    .into_iter()
                    .find(|f| f.key() == key),
                key,
                reason,
            },
            other => FormError {
                field: None,
                key: "(form)".into(),
                reason: other.to_string(),
            },
        };
        let f = config::parse(file, &text).map_err(err)?;
        let (p, _) = config::owner_policy(
            &f,
            &Origin { file, text: &text },
            &PolicyOverrides::default(),
            self.host,
        )
        .map_err(err)?;
        let present = match &p.present {
            None => "frozen while you use the computer".to_owned(),
            Some(l) => format!(
                "{} and {} while you use the computer",
                cores_text(l.cores),
                bytes_words(l.memory_bytes)
            ),
        };
        Ok(format!(
            "{} and {} when you are away (after {} idle); {present}",
            cores_text(p.away.cores),
            bytes_words(p.away.memory_bytes),
            crate::status::duration_words(p.idle_after_s),
        ))
    }
}

/// "1 core", "2.5 cores".
fn cores_text(c: f64) -> String {
    let c = (c * 10.0).round() / 10.0;
    format!("{} core{}", num_text(c), if c == 1.0 { "" } else { "s" })
}

fn json_to_toml(v: &Value) -> Option<toml::Value> {
    Some(match v {
        Value::Bool(b) => toml::Value::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64()?),
        },
        Value::String(s) => toml::Value::String(s.clone()),
        Value::Array(a) => toml::Value::Array(a.iter().map(json_to_toml).collect::<Option<_>>()?),
        Value::Object(o) => {
            let mut t = toml::Table::new();
            for (k, v) in o {
                if !v.is_null() {
                    t.insert(k.clone(), json_to_toml(v)?);
                }
            }
            toml::Value::Table(t)
        }
        Value::Null => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: HostSize = HostSize {
        cores: 8.0,
        memory_bytes: 16 << 30,
    };

    #[test]
    fn presets_validate_and_round_trip_through_the_policy() {
        for p in Preset::ALL {
            let f = LimitsForm::from_preset(p, HOST);
            let summary = f.validate().unwrap_or_else(|e| panic!("{p:?}: {e}"));
            assert!(summary.contains("8 cores"), "{summary}");
            assert_eq!(f.to_set()["preset"], p.name());
        }
        let nights = LimitsForm::from_preset(Preset::NightsAndWeekends, HOST);
        assert!(!nights.schedule.is_empty());
    }

    #[test]
    fn invalid_fields_are_refused_with_the_field_and_why() {
        let mut f = LimitsForm::from_preset(Preset::AlwaysGently, HOST);
        f.set(Field::Memory, "lots".into());
        let e = f.validate().unwrap_err();
        assert_eq!(e.field, Some(Field::Memory));
        assert!(e.reason.contains("is not a size"), "{e}");
        f.set(Field::Memory, "4".into());
        assert!(f.validate().unwrap_err().reason.contains("has no unit"));
        f.set(Field::Memory, "4GiB".into());
        f.set(Field::CpuUsage, "150%".into());
        assert_eq!(f.validate().unwrap_err().field, Some(Field::CpuUsage));
        f.set(Field::CpuUsage, "50%".into());
        f.set(Field::PresentCores, "0".into());
        assert_eq!(f.validate().unwrap_err().field, Some(Field::PresentCores));
        f.set(Field::PresentCores, "1".into());
        f.schedule.push(WindowForm {
            days: "someday".into(),
            from: "19:00".into(),
            to: "07:00".into(),
        });
        assert_eq!(
            f.validate().unwrap_err().field,
            Some(Field::ScheduleDays(0))
        );
        f.set(Field::ScheduleDays(0), "mon-fri".into());
        let ok = f.validate().unwrap();
        assert!(ok.contains("4 cores"), "half of 8 cores at 50%: {ok}");
    }

    #[test]
    fn the_set_object_uses_settings_file_keys() {
        let mut f = LimitsForm::from_preset(Preset::OnlyWhenIdle, HOST);
        f.set(Field::Cores, "50%".into());
        f.set(Field::CpuUsage, String::new());
        f.exclusive_apps = "blender, steam".into();
        let s = f.to_set();
        assert_eq!(s["cores"], "50%");
        assert_eq!(s["memory"], "8GiB");
        assert_eq!(s["cpu_usage"], Value::Null);
        assert_eq!(s["present"], "freeze");
        assert_eq!(s["idle_after"], "5m");
        assert_eq!(s["exclusive_apps"], json!(["blender", "steam"]));
    }
}
