//! When the kernel refuses io_uring (seccomp, `kernel.io_uring_disabled`, old kernels), a store
//! asked for the io_uring engine falls back to the sync engine and works. The test re-runs
//! itself in a child process whose io_uring_setup is blocked by a seccomp filter.

#![cfg(all(target_os = "linux", target_arch = "x86_64"))]

use std::process::Command;

use backing_store::{BackingStore, EngineKind, OpenOptions};
use bytes::Bytes;

const CHILD_ENV: &str = "TANDEM_TEST_URING_REFUSED_CHILD";
const TEST_NAME: &str = "io_uring_refused_falls_back_to_sync";

/// Makes io_uring_setup fail with ENOSYS for this thread and the threads it creates later.
fn block_io_uring_setup() {
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    const LOAD_WORD_ABSOLUTE: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JUMP_IF_EQUAL: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const RETURN: u16 = 0x06; // BPF_RET | BPF_K
    let io_uring_setup = u32::try_from(libc::SYS_io_uring_setup).expect("syscall number");
    let errno = u32::try_from(libc::ENOSYS).expect("errno");
    let statement = |code, k| libc::sock_filter { code, jt: 0, jf: 0, k };
    let jump = |k, jt, jf| libc::sock_filter { code: JUMP_IF_EQUAL, jt, jf, k };
    let mut program = [
        statement(LOAD_WORD_ABSOLUTE, 4), // seccomp_data.arch
        jump(AUDIT_ARCH_X86_64, 1, 0),
        statement(RETURN, SECCOMP_RET_ALLOW),
        statement(LOAD_WORD_ABSOLUTE, 0), // seccomp_data.nr
        jump(io_uring_setup, 0, 1),
        statement(RETURN, SECCOMP_RET_ERRNO | errno),
        statement(RETURN, SECCOMP_RET_ALLOW),
    ];
    let filter = libc::sock_fprog {
        len: u16::try_from(program.len()).expect("program length"),
        filter: program.as_mut_ptr(),
    };
    // SAFETY: PR_SET_NO_NEW_PRIVS takes integer arguments only.
    let result = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    assert_eq!(result, 0, "PR_SET_NO_NEW_PRIVS: {}", std::io::Error::last_os_error());
    // SAFETY: `filter` points at a valid BPF program that outlives the call; the kernel copies
    // it.
    let result = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &filter as *const libc::sock_fprog,
        )
    };
    assert_eq!(result, 0, "PR_SET_SECCOMP: {}", std::io::Error::last_os_error());
}

#[test]
fn io_uring_refused_falls_back_to_sync() {
    if std::env::var_os(CHILD_ENV).is_some() {
        block_io_uring_setup();
        let directory = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("scratch");
        let options = OpenOptions {
            engine: EngineKind::Uring,
            direct_io: true,
            create_size_bytes: Some(1 << 20),
            read_only: false,
        };
        let store =
            BackingStore::open(&directory.path().join("refused.img"), &options).expect("open");
        assert_eq!(store.engine(), EngineKind::Sync, "io_uring was refused, sync must run");
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        runtime.block_on(async {
            store.write(4096, Bytes::from(vec![9u8; 4096]), true).await.expect("write");
            assert!(store.read(4096, 4096).await.expect("read").iter().all(|byte| *byte == 9));
        });
        println!("child: fell back to sync");
        return;
    }
    let output = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", TEST_NAME, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .expect("run child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("child: fell back to sync"),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
