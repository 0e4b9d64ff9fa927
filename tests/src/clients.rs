//! The external clients the storage-node tests run against a LUN or a backing file: QEMU's
//! iSCSI initiator (`qemu-io`) and drbd-utils' `drbdmeta` reading internal metadata.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use crate::{require_tool, run_ok, run_with_timeout};

/// How long one qemu-io run may take (its commands all run in one session).
const QEMU_IO_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one drbdmeta run may take.
const DRBDMETA_TIMEOUT: Duration = Duration::from_secs(30);

/// stdout then stderr of `output`, as text.
pub fn output_text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `qemu-io -f raw -c COMMAND... URL`, failing or not.
pub fn qemu_io<S: AsRef<OsStr>>(url: &str, commands: &[S]) -> Output {
    let mut command = Command::new(require_tool("qemu-io", "qemu-utils qemu-block-extra"));
    command.args(["-f", "raw"]);
    for c in commands {
        command.arg("-c").arg(c);
    }
    command.arg(url);
    run_with_timeout(&mut command, QEMU_IO_TIMEOUT)
}

/// [`qemu_io`] that must succeed with no command reporting `failed` (qemu-io exits 0 when a
/// read or write of its session fails); returns its output.
pub fn qemu_io_ok<S: AsRef<OsStr> + std::fmt::Debug>(url: &str, commands: &[S]) -> String {
    let output = qemu_io(url, commands);
    let text = output_text(&output);
    assert!(
        output.status.success() && !text.contains("failed"),
        "qemu-io {commands:?} on {url}: {text}"
    );
    text
}

/// `drbdmeta --force - v09 DISK internal dump-md`: the DRBD 9 metadata at the end of `disk`.
pub fn dump_md(disk: &Path) -> String {
    let drbdmeta = require_tool("drbdmeta", "drbd-utils");
    run_ok(
        Command::new(drbdmeta)
            .env("DRBD_DRIVER_VERSION_OVERRIDE", "9.2.12")
            .args(["--force", "-", "v09"])
            .arg(disk)
            .args(["internal", "dump-md"]),
        DRBDMETA_TIMEOUT,
    )
}
