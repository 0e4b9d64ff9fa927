//! What an instance is: its spec as the API receives it, the QEMU command line built from it
//! (pure), and the accelerator probe.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::attach::root_port_id;
use crate::connection_info::check_name;
use crate::constants::{
    HOTPLUG_SLOTS_DEFAULT, HOTPLUG_SLOTS_MAX, KVM_PROBE_TIMEOUT_MS, MEMORY_MIB_DEFAULT,
    MEMORY_MIB_MAX, MEMORY_MIB_MIN,
};

/// The machine type. q35 hot-plugs onto reserved pcie-root-ports; `pc` onto its PCI bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Machine {
    #[default]
    Q35,
    Pc,
}

/// An instance as requested (`POST /v2.1/servers`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    pub name: String,
    #[serde(default = "memory_default")]
    pub memory_mib: u32,
    #[serde(default = "vcpus_default")]
    pub vcpus: u32,
    #[serde(default)]
    pub machine: Machine,
    /// Boot a kernel directly (with `initrd` and `cmdline`) ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// ... and/or an image file as the first virtio disk (raw, or qcow2 by extension): booted by
    /// the firmware alone, or the root disk of a directly booted kernel ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<PathBuf>,
    // ... or neither: no OS (firmware only), for storage-only tests.
    #[serde(default = "slots_default")]
    pub hotplug_slots: usize,
}

fn memory_default() -> u32 {
    MEMORY_MIB_DEFAULT
}
fn vcpus_default() -> u32 {
    1
}
fn slots_default() -> usize {
    HOTPLUG_SLOTS_DEFAULT
}

/// Why a spec was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid instance spec: {0}")]
pub struct SpecError(pub String);

impl InstanceSpec {
    pub fn validate(&self) -> Result<(), SpecError> {
        check_name("name", &self.name).map_err(|error| SpecError(error.to_string()))?;
        if !(MEMORY_MIB_MIN..=MEMORY_MIB_MAX).contains(&self.memory_mib) {
            return Err(SpecError(format!(
                "memory_mib {} is outside {MEMORY_MIB_MIN}..={MEMORY_MIB_MAX}",
                self.memory_mib
            )));
        }
        if !(1..=64).contains(&self.vcpus) {
            return Err(SpecError(format!("vcpus {} is outside 1..=64", self.vcpus)));
        }
        if self.hotplug_slots > HOTPLUG_SLOTS_MAX {
            return Err(SpecError(format!(
                "hotplug_slots {} is over {HOTPLUG_SLOTS_MAX}",
                self.hotplug_slots
            )));
        }
        if self.kernel.is_none() && (self.initrd.is_some() || self.cmdline.is_some()) {
            return Err(SpecError("initrd and cmdline need a kernel".into()));
        }
        for path in [&self.kernel, &self.initrd, &self.image].into_iter().flatten() {
            if path.to_str().is_none_or(|text| text.contains(',')) {
                // QEMU's option syntax uses commas; refusing them beats escaping bugs.
                return Err(SpecError(format!(
                    "path {} must be UTF-8 without commas",
                    path.display()
                )));
            }
        }
        if self.cmdline.as_deref().is_some_and(|line| line.contains('\n')) {
            return Err(SpecError("cmdline must be one line".into()));
        }
        Ok(())
    }

    /// True when the instance boots an OS (a kernel or an image), which can answer hot-unplug.
    pub fn has_os(&self) -> bool {
        self.kernel.is_some() || self.image.is_some()
    }

    /// The bus a hot-plugged disk in `slot` goes on.
    pub fn hotplug_bus(&self, slot: usize) -> String {
        match self.machine {
            Machine::Q35 => root_port_id(slot),
            Machine::Pc => "pci.0".into(),
        }
    }
}

/// The accelerator an instance runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The files of one instance in its state directory.
#[derive(Debug, Clone, Serialize)]
pub struct InstancePaths {
    pub dir: PathBuf,
    /// The agent's QMP monitor.
    pub qmp_socket: PathBuf,
    /// A second QMP monitor for operators and tests (`socat - UNIX:...`), so inspecting an
    /// instance never competes with the agent's connection.
    pub operator_qmp_socket: PathBuf,
    /// The guest's first serial port (console), appended to.
    pub console_log: PathBuf,
    /// The guest's second serial port as a Unix socket (the tiny guest's command channel).
    pub channel_socket: PathBuf,
    /// QEMU's own stdout/stderr.
    pub qemu_log: PathBuf,
}

impl InstancePaths {
    pub fn new(dir: &Path) -> InstancePaths {
        InstancePaths {
            dir: dir.to_path_buf(),
            qmp_socket: dir.join("qmp.sock"),
            operator_qmp_socket: dir.join("qmp-operator.sock"),
            console_log: dir.join("console.log"),
            channel_socket: dir.join("channel.sock"),
            qemu_log: dir.join("qemu.log"),
        }
    }
}

fn path_text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// QEMU's arguments for `spec` (after `validate`).
pub fn qemu_args(spec: &InstanceSpec, paths: &InstancePaths, accel: Accel) -> Vec<String> {
    let mut args: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(|item| (*item).to_owned()));
    let machine = match spec.machine {
        Machine::Q35 => "q35",
        Machine::Pc => "pc",
    };
    push(&["-name", &format!("guest={},debug-threads=on", spec.name)]);
    push(&["-machine", machine, "-accel", accel.as_str()]);
    if accel == Accel::Kvm {
        push(&["-cpu", "host"]);
    }
    push(&["-m", &spec.memory_mib.to_string(), "-smp", &spec.vcpus.to_string()]);
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    push(&[
        "-chardev",
        &format!("file,id=console,path={},append=on", path_text(&paths.console_log)),
    ]);
    push(&["-serial", "chardev:console"]);
    push(&[
        "-chardev",
        &format!("socket,id=channel,path={},server=on,wait=off", path_text(&paths.channel_socket)),
    ]);
    push(&["-serial", "chardev:channel"]);
    push(&["-qmp", &format!("unix:{},server=on,wait=off", path_text(&paths.qmp_socket))]);
    push(&["-qmp", &format!("unix:{},server=on,wait=off", path_text(&paths.operator_qmp_socket))]);
    if spec.machine == Machine::Q35 {
        for slot in 0..spec.hotplug_slots {
            let chassis = slot + 1;
            push(&[
                "-device",
                &format!(
                    "pcie-root-port,id={},bus=pcie.0,chassis={chassis},port={chassis}",
                    root_port_id(slot)
                ),
            ]);
        }
    }
    if let Some(kernel) = &spec.kernel {
        push(&["-kernel", &path_text(kernel)]);
        if let Some(initrd) = &spec.initrd {
            push(&["-initrd", &path_text(initrd)]);
        }
        push(&["-append", spec.cmdline.as_deref().unwrap_or("console=ttyS0")]);
    }
    if let Some(image) = &spec.image {
        let format =
            if image.extension().is_some_and(|ext| ext == "qcow2") { "qcow2" } else { "raw" };
        push(&[
            "-drive",
            &format!("file={},format={format},if=virtio,cache=none", path_text(image)),
        ]);
    }
    args
}

/// Probes whether KVM runs guest code: starts QEMU with `-accel kvm` and no OS, and waits for
/// SeaBIOS to reach its "no bootable device" message on the debug console. Here `-accel kvm`
/// starts but never runs a guest to that point, so only a probe that watches progress tells.
pub async fn probe_kvm(qemu: &Path, scratch_dir: &Path) -> bool {
    let kvm_usable = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
    if !kvm_usable {
        return false;
    }
    let log = scratch_dir.join("kvm-probe.log");
    let _ = std::fs::remove_file(&log);
    let mut child = match tokio::process::Command::new(qemu)
        // The same CPU model instances get: here plain `-accel kvm` has run SeaBIOS while
        // `-cpu host` aborted at vCPU setup (failed to set MSR 0x10a), so probe what we use.
        .args(["-accel", "kvm", "-cpu", "host", "-machine", "pc", "-nodefaults", "-no-user-config"])
        .args(["-display", "none", "-m", "64"])
        .args(["-chardev", &format!("file,id=probe,path={}", log.display())])
        .args(["-device", "isa-debugcon,iobase=0x402,chardev=probe"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(child) => child,
        Err(_) => return false,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_millis(KVM_PROBE_TIMEOUT_MS);
    let mut ran = false;
    while tokio::time::Instant::now() < deadline {
        if std::fs::read_to_string(&log).is_ok_and(|text| text.contains("No bootable device")) {
            ran = true;
            break;
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill().await;
    let _ = std::fs::remove_file(&log);
    ran
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> InstanceSpec {
        serde_json::from_value(serde_json::json!({"name": "vm-1"})).expect("defaults")
    }

    #[test]
    fn defaults_and_command_line() {
        let mut spec = spec();
        assert_eq!(spec.memory_mib, MEMORY_MIB_DEFAULT);
        assert_eq!(spec.hotplug_slots, HOTPLUG_SLOTS_DEFAULT);
        spec.kernel = Some("/g/vmlinuz".into());
        spec.initrd = Some("/g/initrd.img".into());
        spec.cmdline = Some("console=ttyS0 tandem.channel".into());
        spec.validate().expect("valid");
        let paths = InstancePaths::new(Path::new("/state/vm-1"));
        let args = qemu_args(&spec, &paths, Accel::Tcg).join(" ");
        for needle in [
            "-machine q35 -accel tcg",
            "-qmp unix:/state/vm-1/qmp.sock,server=on,wait=off",
            "-qmp unix:/state/vm-1/qmp-operator.sock",
            "path=/state/vm-1/console.log",
            "path=/state/vm-1/channel.sock",
            "pcie-root-port,id=tandem-port0,bus=pcie.0,chassis=1,port=1",
            "pcie-root-port,id=tandem-port3,bus=pcie.0,chassis=4,port=4",
            "-kernel /g/vmlinuz -initrd /g/initrd.img -append console=ttyS0 tandem.channel",
        ] {
            assert!(args.contains(needle), "{needle} missing from {args}");
        }
        assert!(!args.contains("tandem-port4"));
        assert!(!args.contains("-cpu host"));
        assert!(qemu_args(&spec, &paths, Accel::Kvm).join(" ").contains("-accel kvm -cpu host"));
        spec.machine = Machine::Pc;
        let pc = qemu_args(&spec, &paths, Accel::Tcg).join(" ");
        assert!(!pc.contains("pcie-root-port"));
        assert_eq!(spec.hotplug_bus(3), "pci.0");
        spec.image = Some("/images/root.qcow2".into());
        spec.validate().expect("a kernel with a root image is valid");
        let with_image = qemu_args(&spec, &paths, Accel::Tcg).join(" ");
        assert!(
            with_image.contains("-drive file=/images/root.qcow2,format=qcow2,if=virtio,cache=none")
        );
    }

    #[test]
    fn bad_specs_are_refused() {
        type Edit = Box<dyn Fn(&mut InstanceSpec)>;
        let edits: Vec<(&str, Edit)> = vec![
            ("name", Box::new(|s| s.name = "a b".into())),
            ("memory_mib", Box::new(|s| s.memory_mib = 1)),
            ("vcpus", Box::new(|s| s.vcpus = 0)),
            ("hotplug_slots", Box::new(|s| s.hotplug_slots = HOTPLUG_SLOTS_MAX + 1)),
            ("need a kernel", Box::new(|s| s.initrd = Some("/i".into()))),
            ("commas", Box::new(|s| s.image = Some("/a,b".into()))),
        ];
        for (needle, edit) in edits {
            let mut spec = spec();
            edit(&mut spec);
            let error = spec.validate().expect_err(needle);
            assert!(error.to_string().contains(needle), "{error} should mention {needle}");
        }
        let unknown =
            serde_json::from_value::<InstanceSpec>(serde_json::json!({"name": "x", "flavour": 1}));
        assert!(unknown.is_err(), "unknown fields are refused");
    }
}
