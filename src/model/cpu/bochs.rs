//! Runs a function of this test process on an emulated AMX CPU: the Bochs x86 emulator with its
//! Sapphire Rapids model, which executes `ldtilecfg`, `tileloadd` and `tdpbf16ps` as Intel's SDM
//! describes them. Tests only: the AMX kernel's instructions get executed on every machine that
//! has such a Bochs, not only on the rare Xeon with AMX.
//!
//! There is no operating system in the guest. The process copies itself: every readable mapping
//! of its address space (code, data, heap, the libraries) goes into a RAM image, page tables map
//! each page at its own virtual address, and a small ROM of our own (below) takes the emulated
//! CPU from its reset state to 64-bit mode with AVX-512 and the tile state enabled, sets the
//! thread pointer, calls the function on a stack of its own, and prints the bytes of the
//! buffers asked for on Bochs's debug port (`0xE9`), hex-encoded, before it shuts Bochs down.
//! The function therefore runs exactly as compiled and linked here: glibc's routines as chosen
//! for this CPU (all of them within what the emulated Xeon runs, or the guest reports an
//! invalid opcode), and CPU features as detected here if they were before the copy (the tests
//! detect nothing natively until their guests have run, so that the guest detects its own).
//! There is no kernel: what one would set up and grant is a [`Machine`] (the state enabled in
//! XCR0, the tile permission). Of the system calls, the ROM grants the one the AMX detection
//! makes (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`) as Linux does, passes writes to
//! stdout and stderr to the debug port (a panic's message), fails `brk`, ends the run at an
//! exit or a kill (an abort), and answers any other with -ENOSYS, as a sandbox would, listing it
//! in the [`Outcome`]. An exception stops the run, reported with the faulting address; the
//! stack has a guard page below it, and page 0 is not mapped.
//!
//! The function runs on the calling thread's state, so a rayon call inside it works when that
//! thread is the only worker of a one-thread pool (its jobs then run inline), and its
//! allocations must come from memory the allocator already holds: [`prepare_thread`].
//!
//! The Bochs binary: built by `scripts/bochs-amx.sh` (AMX and AVX-512 compiled in, and a fix
//! to how it loads a RAM image), or named by `DIRACNET_BOCHS`; see [`emulator`].

use std::fmt::Write as _;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

const PAGE: usize = 4096;
/// Where the RAM image starts (physical): its first page is the parameter block.
const IMAGE_AT: u64 = 0x20_0000;
/// Physical memory below 4 MiB is mapped at the same virtual addresses (the ROM, the IDT at
/// 0x1000, the ROM's stack below 2 MiB, the parameter block); the process's mappings must lie
/// above.
const IDENTITY_END: u64 = 0x40_0000;
/// The guest's stack.
const STACK: usize = 4 << 20;
/// At most this many buffers printed back.
const MAX_OUTPUTS: usize = 32;
/// Numbers each run's temporary folder.
static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

// The ROM: reset → protected mode → long mode (paging from the image) → the call → the output.
// Bochs maps a 64 KiB ROM at 0xF0000, so the code at offset `x` runs at physical 0xF0000 + x;
// the reset vector (offset 0xFFF0) jumps to offset 0 ([`rom`] writes that jump).
std::arch::global_asm!(
    r##"
    .pushsection .rodata.diracnet_bochs_rom, "a", @progbits
    .p2align 4
    .globl diracnet_bochs_rom
diracnet_bochs_rom:
    # Real mode, at 0xf000:0. Load the GDT, enter protected mode.
    .code16
    cli
    cld
    movw $0xf000, %ax
    movw %ax, %ds
    lgdtl (9f - diracnet_bochs_rom)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $(0xf0000 + 1f - diracnet_bochs_rom)

    # 32-bit protected mode: PAE, CR3 from the parameter block, EFER.LME, paging: long mode.
    .code32
1:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl 0x200008, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000000, %eax
    movl %eax, %cr0
    ljmpl $0x18, $(0xf0000 + 2f - diracnet_bochs_rom)

    # 64-bit mode. CR0: MP and NE, no EM; CR4: OSFXSR, OSXMMEXCPT, OSXSAVE; XCR0 from the
    # parameter block (the OS's choice of state: x87, SSE, AVX, AVX-512, the tiles).
    .code64
2:
    movl $0x1f0000, %esp
    movq %cr0, %rax
    andq $-5, %rax
    orq $0x22, %rax
    movq %rax, %cr0
    movq %cr4, %rax
    orq $0x40600, %rax
    movq %rax, %cr4
    xorl %ecx, %ecx
    movl 0x200030, %eax
    movl 0x200034, %edx
    xsetbv
    fninit
    # The IDT at 0x1000: vector v's gate to the stub at 20 + 16·v.
    leaq 20f(%rip), %rsi
    movl $0x1000, %edi
    xorl %ecx, %ecx
3:
    movq %rsi, %rax
    movw %ax, (%rdi)
    movw $0x18, 2(%rdi)
    movw $0x8e00, 4(%rdi)
    shrq $16, %rax
    movw %ax, 6(%rdi)
    shrq $16, %rax
    movl %eax, 8(%rdi)
    movl $0, 12(%rdi)
    addq $16, %rsi
    addq $16, %rdi
    incl %ecx
    cmpl $32, %ecx
    jb 3b
    lidt 10f(%rip)
    # The thread pointer (FS base); SYSCALL enabled, to the handler at 40.
    movl $0xc0000100, %ecx
    movq 0x200028, %rax
    movq %rax, %rdx
    shrq $32, %rdx
    wrmsr
    movl $0xc0000080, %ecx
    rdmsr
    orl $1, %eax
    wrmsr
    movl $0xc0000081, %ecx
    xorl %eax, %eax
    movl $0x8, %edx
    wrmsr
    movl $0xc0000082, %ecx
    leaq 40f(%rip), %rax
    movq %rax, %rdx
    shrq $32, %rdx
    wrmsr
    movl $0xc0000084, %ecx
    xorl %eax, %eax
    xorl %edx, %edx
    wrmsr
    # The call: stack, argument and function from the parameter block.
    movq 0x200020, %rsp
    movq 0x200018, %rdi
    movq 0x200010, %rax
    callq *%rax
    # "#DON <rax>", then "OUT: <hex>" for each buffer listed from 0x200048.
    movl $0x1f0000, %esp
    movq %rax, %rbx
    movl $0x4e4f4423, %edi
    callq 30f
    movq %rbx, %rax
    callq 31f
    movl $10, %edi
    callq 33f
    movq 0x200040, %r12
    movl $0x200048, %r13d
4:
    testq %r12, %r12
    jz 6f
    movl $0x3a54554f, %edi
    callq 30f
    movq (%r13), %r14
    movq 8(%r13), %r15
5:
    testq %r15, %r15
    jz 7f
    movzbl (%r14), %eax
    callq 32f
    incq %r14
    decq %r15
    jmp 5b
7:
    movl $10, %edi
    callq 33f
    addq $16, %r13
    decq %r12
    jmp 4b
    # Bochs's shutdown port: "Shutdown".
6:
    movw $0x8900, %dx
    movb $0x53, %al
    outb %al, %dx
    movb $0x68, %al
    outb %al, %dx
    movb $0x75, %al
    outb %al, %dx
    movb $0x74, %al
    outb %al, %dx
    movb $0x64, %al
    outb %al, %dx
    movb $0x6f, %al
    outb %al, %dx
    movb $0x77, %al
    outb %al, %dx
    movb $0x6e, %al
    outb %al, %dx
8:
    hlt
    jmp 8b

    # Exception stubs, 16 bytes each: the vector in ebx, then to 21, which prints
    # "#EXC <vector> <the stack's top three words> <cr2>" and shuts down.
    .p2align 4
20:
    .irp vector, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .p2align 4
    movl $\vector, %ebx
    jmp 21f
    .endr
    .p2align 4
21:
    movq %rsp, %rbp
    movl $0x1f0000, %esp
    movl $0x43584523, %edi
    callq 30f
    movq %rbx, %rax
    callq 37f
    movq (%rbp), %rax
    callq 37f
    movq 8(%rbp), %rax
    callq 37f
    movq 16(%rbp), %rax
    callq 37f
    movq %cr2, %rax
    callq 31f
    movl $10, %edi
    callq 33f
    jmp 6b

    # SYSCALL: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) returns 0 (or -EPERM, if the
    # parameter block says so), write to stdout
    # or stderr goes to the port, brk fails; any other prints "#SYS <number> <rdi> <rsi>
    # <return address>" and returns -ENOSYS, as a sandbox would, or, for a call that ends the
    # process, shuts down. On the ROM's stack, not the guest's (its red zone); rax, rcx and r11
    # are the call's to clobber, the rest is kept.
40:
    cmpq $158, %rax
    jne 42f
    cmpq $0x1023, %rdi
    jne 41f
    cmpq $18, %rsi
    jne 41f
    xorl %eax, %eax
    # The parameter block may say no (-EPERM), as a sandbox's kernel would.
    cmpq $0, 0x200038
    je 47f
    movq $-1, %rax
47:
    jmpq *%rcx
    # write(1 or 2, buf, n): the bytes to port 0xe9 (a panic's message), n returned.
42:
    cmpq $1, %rax
    jne 46f
    cmpq $1, %rdi
    je 43f
    cmpq $2, %rdi
    jne 41f
43:
    movq %rsp, %r11
    movl $0x1f0000, %esp
    pushq %r11
    pushq %rcx
    pushq %rsi
    pushq %rdx
44:
    testq %rdx, %rdx
    jz 45f
    movb (%rsi), %al
    outb %al, $0xe9
    incq %rsi
    decq %rdx
    jmp 44b
45:
    popq %rdx
    popq %rsi
    popq %rcx
    popq %r11
    movq %r11, %rsp
    movq %rdx, %rax
    jmpq *%rcx
    # brk: 0, which glibc reads as "no more memory" (-ENOSYS it would take for success).
46:
    cmpq $12, %rax
    jne 41f
    xorl %eax, %eax
    jmpq *%rcx
41:
    movq %rsp, %r11
    movl $0x1f0000, %esp
    pushq %r11
    pushq %rcx
    pushq %rdi
    pushq %rsi
    pushq %rax
    movl $0x53595323, %edi
    callq 30f
    movq (%rsp), %rax
    callq 37f
    movq 16(%rsp), %rax
    callq 37f
    movq 8(%rsp), %rax
    callq 37f
    movq 24(%rsp), %rax
    callq 31f
    movl $10, %edi
    callq 33f
    popq %rax
    # exit, kill, tkill, exit_group, tgkill (an abort): the run ends here.
    cmpq $60, %rax
    je 6b
    cmpq $62, %rax
    je 6b
    cmpq $200, %rax
    je 6b
    cmpq $231, %rax
    je 6b
    cmpq $234, %rax
    je 6b
    popq %rsi
    popq %rdi
    popq %rcx
    popq %r11
    movq %r11, %rsp
    movq $-38, %rax
    jmpq *%rcx

    # Printing on port 0xe9: 30, the four bytes of edi and a space; 31, rax in 16 hex digits;
    # 32, al in 2; 33, the byte in edi; 35, one hex digit; 37, rax in 16 and a space.
30:
    movl %edi, %eax
    outb %al, $0xe9
    shrl $8, %eax
    outb %al, $0xe9
    shrl $8, %eax
    outb %al, $0xe9
    shrl $8, %eax
    outb %al, $0xe9
    movb $32, %al
    outb %al, $0xe9
    ret

31:
    movq %rax, %rsi
    movl $16, %ecx
34:
    rolq $4, %rsi
    movl %esi, %eax
    andl $15, %eax
    callq 35f
    decl %ecx
    jnz 34b
    ret

32:
    movl %eax, %esi
    shrl $4, %eax
    callq 35f
    movl %esi, %eax
    andl $15, %eax
    callq 35f
    ret

35:
    cmpb $10, %al
    jb 36f
    addb $39, %al
36:
    addb $48, %al
    outb %al, $0xe9
    ret

33:
    movl %edi, %eax
    outb %al, $0xe9
    ret

37:
    callq 31b
    movl $32, %edi
    callq 33b
    ret

    # The GDT's and the IDT's descriptors; the GDT: null, 32-bit code, data, 64-bit code.
    .p2align 3
9:
    .word 31
    .long 0xf0000 + 11f - diracnet_bochs_rom
10:
    .word 32 * 16 - 1
    .quad 0x1000
    .p2align 3
11:
    .quad 0
    .quad 0x00cf9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00af9a000000ffff
    # Padded to a fixed size: Rust declares the ROM's code as one array of it.
    .org diracnet_bochs_rom + 4096
    .popsection
"##,
    options(att_syntax)
);

/// Bytes of the ROM's code, padded (the `.org` above; the assembler refuses code past it).
const ROM_CODE: usize = 4096;

unsafe extern "C" {
    static diracnet_bochs_rom: [u8; ROM_CODE];
}

/// The 64 KiB ROM: the code above from offset 0, and at the reset vector a far jump to it.
fn rom() -> Vec<u8> {
    // SAFETY: a read-only array of `ROM_CODE` bytes, defined in the section above.
    let code: &[u8; ROM_CODE] = unsafe { &diracnet_bochs_rom };
    let mut rom = vec![0u8; 0x1_0000];
    rom[..ROM_CODE].copy_from_slice(code);
    // jmp far 0xf000:0x0000
    rom[0xfff0..0xfff5].copy_from_slice(&[0xea, 0x00, 0x00, 0x00, 0xf0]);
    rom
}

/// What the guest function returned, the buffers it was asked to print, and the system calls
/// it made that the ROM answered with -ENOSYS.
#[derive(Debug)]
pub(super) struct Outcome {
    pub(super) returned: u64,
    pub(super) outputs: Vec<Vec<u8>>,
    /// `#SYS <number> <rdi> <rsi> <return address>` (hex), then where that address is.
    pub(super) syscalls: Vec<String>,
}

/// The Bochs binary: `DIRACNET_BOCHS`, else where `scripts/bochs-amx.sh` builds it (the cache
/// folder's `bochs-amx/bochs`); or why there is none. With `DIRACNET_REQUIRE_AMX_EMULATOR=1`
/// (what `.ci/run` sets) a missing one fails the calling test instead of skipping it.
pub(super) fn emulator() -> Result<PathBuf, String> {
    // An empty variable counts as unset, as in scripts/bochs-amx.sh.
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    let path = var("DIRACNET_BOCHS").map_or_else(
        || {
            let cache = var("DIRACNET_CACHE").map_or_else(
                || {
                    var("XDG_CACHE_HOME")
                        .map(PathBuf::from)
                        .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache")))
                        .unwrap_or_default()
                        .join("diracnet")
                },
                PathBuf::from,
            );
            cache.join("bochs-amx").join("bochs")
        },
        PathBuf::from,
    );
    if path.is_file() {
        return Ok(path);
    }
    let why = format!(
        "no Bochs with AMX at {} (scripts/bochs-amx.sh builds one; DIRACNET_BOCHS names another)",
        path.display()
    );
    let required = std::env::var_os("DIRACNET_REQUIRE_AMX_EMULATOR").is_some_and(|v| v != "0");
    assert!(!required, "DIRACNET_REQUIRE_AMX_EMULATOR is set, but {why}");
    Err(why)
}

/// Readies this thread for guest runs, which cannot ask a kernel for anything: glibc keeps what
/// it frees and serves big blocks from its heaps (no `mmap`, no trimming), and this thread's
/// heap grows by `reserve` bytes, free, for the guest's allocations; the thread's hashing keys
/// (std's `RandomState`, from `getrandom` on first use) are drawn here.
pub(super) fn prepare_thread(reserve: usize) {
    // SAFETY: mallopt only changes glibc's allocation policy.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
    drop(std::hint::black_box(Vec::<u8>::with_capacity(reserve)));
    std::hint::black_box(std::collections::hash_map::RandomState::new());
}

/// A folder of this run's files, removed with it (the RAM image is as large as the process).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "diracnet-bochs-{}-{}",
            std::process::id(),
            RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("a temporary folder");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Zeroed memory straight from the kernel, not from the allocator: what the copying needs
/// must leave the allocator's free memory to the guest (whose allocations reuse it).
struct Scratch {
    ptr: *mut u8,
    len: usize,
}

impl Scratch {
    fn new(len: usize) -> Self {
        // SAFETY: an anonymous private mapping, at an address of the kernel's choosing.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap of {len} bytes");
        Self {
            ptr: ptr.cast(),
            len,
        }
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `len` bytes mapped readable and writable, owned by `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: the mapping `new` made; nothing borrows it past `self`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// Page tables for the guest: 4-level, 4 KiB pages, every page present and writable. Table
/// `t` sits at physical `base + t·4096`; table 0 is the PML4.
struct Tables {
    base: u64,
    room: Scratch,
    len: usize,
}

impl Tables {
    /// The PML4 alone, with room for `room` bytes of tables.
    fn new(room: usize) -> Self {
        Self {
            base: 0,
            room: Scratch::new(room),
            len: PAGE,
        }
    }

    fn bytes(&mut self) -> &[u8] {
        let len = self.len;
        &self.room.bytes()[..len]
    }

    fn entry(&mut self, table: u64, index: u64) -> &mut [u8; 8] {
        let at = (table - self.base) as usize + index as usize * 8;
        (&mut self.room.bytes()[at..at + 8])
            .try_into()
            .expect("8 bytes")
    }

    /// The table that `table[index]` points to, made if absent.
    fn next(&mut self, table: u64, index: u64) -> u64 {
        let e = u64::from_le_bytes(*self.entry(table, index));
        if e & 1 == 1 {
            return e & !0xfff;
        }
        let new = self.base + self.len as u64;
        assert!(
            self.len + PAGE <= self.room.len,
            "more page tables than room"
        );
        self.len += PAGE;
        *self.entry(table, index) = (new | 0b11).to_le_bytes();
        new
    }

    fn map(&mut self, va: u64, pa: u64) {
        let pdpt = self.next(self.base, va >> 39 & 511);
        let pd = self.next(pdpt, va >> 30 & 511);
        let pt = self.next(pd, va >> 21 & 511);
        *self.entry(pt, va >> 12 & 511) = (pa | 0b11).to_le_bytes();
    }
}

/// The readable mappings of this process (start, end), from the text of `/proc/self/maps`.
fn mappings(maps: &str) -> impl Iterator<Item = (u64, u64)> + '_ {
    maps.lines().filter_map(|line| {
        let mut fields = line.split_whitespace();
        let (range, perms) = (fields.next()?, fields.next()?);
        let name = fields.nth(3).unwrap_or("");
        if !perms.starts_with('r') || matches!(name, "[vvar]" | "[vvar_vclock]" | "[vsyscall]") {
            return None;
        }
        let (start, end) = range.split_once('-')?;
        Some((
            u64::from_str_radix(start, 16).ok()?,
            u64::from_str_radix(end, 16).ok()?,
        ))
    })
}

/// `address` as a file and an offset in it, from the text of `/proc/self/maps`.
fn where_is(maps: &str, address: u64) -> Option<String> {
    maps.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (start, end) = fields.next()?.split_once('-')?;
        let (start, end) = (
            u64::from_str_radix(start, 16).ok()?,
            u64::from_str_radix(end, 16).ok()?,
        );
        let offset = u64::from_str_radix(fields.nth(1)?, 16).ok()?;
        let path = fields.nth(2)?;
        (start..end)
            .contains(&address)
            .then(|| format!("[{address:#x} is {path} + {:#x}]", address - start + offset))
    })
}

/// Runs `f` on the emulated CPU, on a fresh 4 MiB stack and this thread's thread pointer, and
/// prints back `outputs` (as they are after `f`), within a minute. An exception in the guest is
/// an `Err` naming the vector and the faulting address; system calls are answered as the module
/// says and listed in the [`Outcome`].
pub(super) fn run(
    bochs: &std::path::Path,
    f: &mut dyn FnMut() -> u64,
    outputs: &[&[u8]],
) -> Result<Outcome, String> {
    run_on(Machine::default(), bochs, f, outputs)
}

/// What the guest's "OS" set up and grants, and how long it may run.
#[derive(Debug, Clone, Copy)]
pub(super) struct Machine {
    /// The state components enabled in XCR0 (what a kernel supports): by default x87, SSE, AVX,
    /// the AVX-512 state and the tile state (bits 17 and 18).
    pub(super) xcr0: u64,
    /// Whether `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)` succeeds (else -EPERM).
    pub(super) tile_permission: bool,
    /// A guest still running then is stopped (an error).
    pub(super) limit: std::time::Duration,
}

impl Default for Machine {
    fn default() -> Self {
        Self {
            xcr0: 0x600e7,
            tile_permission: true,
            limit: std::time::Duration::from_secs(60),
        }
    }
}

/// [`run`] on the `machine` given.
pub(super) fn run_on(
    machine: Machine,
    bochs: &std::path::Path,
    f: &mut dyn FnMut() -> u64,
    outputs: &[&[u8]],
) -> Result<Outcome, String> {
    let limit = machine.limit;
    assert!(outputs.len() <= MAX_OUTPUTS, "bochs::run: too many outputs");
    extern "C" fn trampoline(f: *mut &mut dyn FnMut() -> u64) -> u64 {
        // SAFETY: `run` passes a pointer to its live `&mut dyn FnMut`.
        let f = unsafe { &mut *f };
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(u64::MAX)
    }
    let mut f = f;
    // The guest's stack, 4 MiB above a guard page: not readable, so not mapped in the guest,
    // where an overflow then faults instead of writing over the heap.
    let stack = Scratch::new(STACK + PAGE);
    // SAFETY: the first page of the mapping `stack` owns.
    let guarded = unsafe { libc::mprotect(stack.ptr.cast(), PAGE, libc::PROT_NONE) };
    assert_eq!(guarded, 0, "mprotect of the stack's guard page");
    let top = (stack.ptr as u64 + stack.len as u64) & !15;
    let mut fs_base = 0u64;
    // SAFETY: ARCH_GET_FS writes the thread pointer to the address given.
    let got = unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            0x1003 as libc::c_long,
            &raw mut fs_base,
        )
    };
    assert_eq!(got, 0, "arch_prctl(ARCH_GET_FS)");

    let dir = TempDir::new();
    let dir = dir.0.as_path();
    let (rom_path, ram_path, rc_path, log_path) = (
        dir.join("rom.bin"),
        dir.join("ram.bin"),
        dir.join("bochsrc"),
        dir.join("bochs.log"),
    );
    std::fs::write(&rom_path, rom()).expect("writing the ROM");
    // Bochs's VGA card needs a ROM too; nothing calls it.
    let vga_path = dir.join("vga.bin");
    std::fs::write(&vga_path, [0u8; 0x8000]).expect("writing the VGA ROM");

    // The RAM image, written as it is read: the parameter block, every readable page at the
    // next free physical page, then the page tables. What the copying needs is mapped before
    // the mappings are listed, outside the allocator: an allocation could grow the heap past
    // what the list says, or take the free memory the guest's allocations expect.
    let ram = std::fs::File::create(&ram_path).expect("creating the RAM image");
    let mem = std::fs::File::open("/proc/self/mem").expect("opening /proc/self/mem");
    let mut maps_file = std::fs::File::open("/proc/self/maps").expect("opening /proc/self/maps");
    let mut maps_room = Scratch::new(4 << 20);
    let mut chunk = Scratch::new(1 << 20);
    let mut tables = Tables::new(8 << 20);
    let maps_len = {
        let buf = maps_room.bytes();
        let mut len = 0;
        loop {
            let read = std::io::Read::read(&mut maps_file, &mut buf[len..])
                .expect("reading /proc/self/maps");
            assert!(
                read > 0 || len < buf.len(),
                "/proc/self/maps longer than room"
            );
            if read == 0 {
                break len;
            }
            len += read;
        }
    };
    let maps_bytes = &maps_room.bytes()[..maps_len];
    let maps = std::str::from_utf8(maps_bytes).expect("/proc/self/maps in UTF-8");
    let data_pages: u64 = mappings(maps).map(|(s, e)| (e - s) / PAGE as u64).sum();
    tables.base = IMAGE_AT + (1 + data_pages) * PAGE as u64;
    let chunk = chunk.bytes();
    let mut at = PAGE as u64;
    for (start, end) in mappings(maps) {
        assert!(start >= IDENTITY_END, "a mapping below 4 MiB: {start:#x}");
        let readable = (start..end).step_by(chunk.len()).all(|from| {
            let len = chunk.len().min((end - from) as usize);
            let ok = mem.read_exact_at(&mut chunk[..len], from).is_ok();
            // Zeros left as a hole in the file (a free reserve is mostly zeros).
            let zeros = chunk[..len].iter().all(|&b| b == 0);
            ok && (zeros || ram.write_all_at(&chunk[..len], at + (from - start)).is_ok())
        });
        // An unreadable mapping after all (a guard, a device's): left unmapped, zeros here.
        if readable {
            for va in (start..end).step_by(PAGE) {
                tables.map(va, IMAGE_AT + at + (va - start));
            }
        }
        at += end - start;
    }
    // The first 4 MiB, identical, but for page 0: a null pointer in the guest faults.
    for va in (PAGE as u64..IDENTITY_END).step_by(PAGE) {
        tables.map(va, va);
    }
    let pml4 = tables.base;
    ram.write_all_at(tables.bytes(), at)
        .expect("writing the page tables");
    let mut block = vec![
        0x6469_7261_636e_6574, // magic, unused by the ROM
        pml4,
        trampoline as *const () as u64,
        &raw mut f as u64,
        top,
        fs_base,
        machine.xcr0,
        u64::from(!machine.tile_permission),
        outputs.len() as u64,
    ];
    for o in outputs {
        block.extend([o.as_ptr() as u64, o.len() as u64]);
    }
    let block: Vec<u8> = block.iter().flat_map(|v| v.to_le_bytes()).collect();
    ram.write_all_at(&block, 0)
        .expect("writing the parameter block");
    let image_len = at as usize + tables.len;
    // CR3 is loaded in 32-bit mode, and the APICs sit below 4 GiB.
    assert!(
        IMAGE_AT + image_len as u64 <= 0xc000_0000,
        "the process is too large to copy: {image_len} bytes"
    );
    drop((ram, mem));

    let megs = (IMAGE_AT as usize + image_len).div_ceil(1 << 20) + 16;
    let mut rc = String::new();
    writeln!(rc, "romimage: file={}", rom_path.display()).unwrap();
    writeln!(rc, "vgaromimage: file={}", vga_path.display()).unwrap();
    writeln!(
        rc,
        "optramimage1: file={}, address={IMAGE_AT:#x}",
        ram_path.display()
    )
    .unwrap();
    writeln!(rc, "memory: guest={megs}, host={megs}").unwrap();
    writeln!(
        rc,
        "cpu: model=sapphire_rapids, count=1, reset_on_triple_fault=0"
    )
    .unwrap();
    writeln!(rc, "display_library: nogui").unwrap();
    writeln!(rc, "port_e9_hack: enabled=1").unwrap();
    writeln!(rc, "clock: sync=none, time0=1").unwrap();
    writeln!(rc, "log: {}", log_path.display()).unwrap();
    writeln!(rc, "panic: action=fatal").unwrap();
    writeln!(rc, "error: action=report").unwrap();
    std::fs::write(&rc_path, rc).expect("writing the Bochs configuration");
    // Output to files, not pipes: the wait below polls, to stop a guest that runs too long.
    let (out_path, err_path) = (dir.join("stdout"), dir.join("stderr"));
    let file = |p: &std::path::Path| std::fs::File::create(p).expect("a Bochs output file");
    let mut child = Command::new(bochs)
        .args(["-q", "-f"])
        .arg(&rc_path)
        .stdin(Stdio::null())
        .stdout(file(&out_path))
        .stderr(file(&err_path))
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bochs.display()))?;
    let started = std::time::Instant::now();
    let timed_out = loop {
        match child.try_wait() {
            Ok(Some(_)) => break false,
            Ok(None) if started.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                break true;
            }
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(20)),
            Err(e) => return Err(format!("waiting for Bochs: {e}")),
        }
    };
    let read = |p: &std::path::Path| {
        String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned()
    };
    let (stdout, stderr) = (read(&out_path), read(&err_path));
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let failure = |why: String| {
        let tail: Vec<_> = log.lines().rev().take(15).collect();
        let tail: Vec<_> = tail.into_iter().rev().collect();
        format!(
            "{why}\n--- Bochs stdout ---\n{stdout}\n--- Bochs stderr ---\n{stderr}\n--- \
             bochs.log (end) ---\n{}",
            tail.join("\n")
        )
    };
    if timed_out {
        return Err(failure(format!("the guest ran past {limit:?}")));
    }
    // Each unanswered system call, with where it was made.
    let syscalls = stdout
        .lines()
        .filter(|l| l.starts_with("#SYS"))
        .map(|line| {
            let rip = line
                .split_whitespace()
                .nth(4)
                .and_then(|w| u64::from_str_radix(w, 16).ok());
            let place = rip.and_then(|rip| where_is(maps, rip)).unwrap_or_default();
            format!("{line} {place}")
        })
        .collect();
    if let Some(line) = stdout.lines().find(|l| l.starts_with("#EXC")) {
        // Which file the faulting address is in, and where: for `addr2line` or `objdump`.
        let words: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|w| u64::from_str_radix(w, 16).ok())
            .collect();
        let place = words
            .iter()
            .filter_map(|&rip| where_is(maps, rip))
            .next()
            .unwrap_or_default();
        return Err(failure(format!(
            "the guest raised an exception: {line} (vector, then the stack: [error code,] \
             rip, cs, then cr2; 6 at a `syscall` is a system call) {place}"
        )));
    }
    let mut lines = stdout.lines().skip_while(|l| !l.starts_with("#DON"));
    let returned = lines
        .next()
        .and_then(|l| u64::from_str_radix(l.trim_start_matches("#DON ").trim(), 16).ok())
        .ok_or_else(|| {
            let nested = log.contains("3rd") || log.contains("triple");
            failure(if nested {
                "the guest did not return: a fault while handling a fault (a stack overflow?)"
                    .into()
            } else {
                "the guest did not return (an abort? see its system calls and output)".into()
            })
        })?;
    let outputs = outputs
        .iter()
        .enumerate()
        .map(|(i, want)| {
            let hex = lines
                .next()
                .and_then(|l| l.strip_prefix("OUT: "))
                .map(str::trim)
                .filter(|hex| hex.len() == 2 * want.len())
                .ok_or_else(|| {
                    failure(format!("output {i} missing or not {} bytes", want.len()))
                })?;
            (0..want.len())
                .map(|k| u8::from_str_radix(&hex[2 * k..2 * k + 2], 16))
                .collect::<Result<Vec<u8>, _>>()
                .map_err(|e| failure(format!("output {i} not hex: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    drop(stack);
    Ok(Outcome {
        returned,
        outputs,
        syscalls,
    })
}

/// Runs the test `name` (its path below the crate) alone, in a child process of this test
/// binary, and checks that it ran and passed; true in that child, where the test's body goes
/// on. Guest runs need it: [`prepare_thread`] changes the whole process's allocator, and a
/// test thread beside them could hold the allocator's lock when the process is copied.
pub(super) fn alone(name: &str) -> bool {
    const CHILD: &str = "DIRACNET_BOCHS_CHILD";
    if std::env::var(CHILD).is_ok_and(|v| v == name) {
        return true;
    }
    let exe = std::env::current_exe().expect("this test binary");
    let out = Command::new(exe)
        .args([
            name,
            "--exact",
            "--include-ignored",
            "--test-threads=1",
            "--nocapture",
        ])
        .env(CHILD, name)
        // One arena, the main one: its heap grows without bound (a thread's is capped at 64
        // MiB), so one reserve serves the guest's allocations from any thread.
        .env("GLIBC_TUNABLES", "glibc.malloc.arena_max=1")
        .output()
        .expect("running the test in a child process");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{name} failed in its child process");
    assert!(
        stdout.contains("1 passed"),
        "{name} did not run in its child process"
    );
    false
}

/// A function in the guest, then the AMX kernels there against the software model of the
/// tiles, to the bit (Bochs sums as the SDM says, and so does the model): the instructions, their
/// operands, the tile configuration and the strides, which the model cannot check.
#[cfg(test)]
mod tests {
    use super::super::amx::{self, Hardware, Model};
    use super::super::bf16::{self, Kernel, PackedBf16};
    use super::super::direct::DirectConvBf16;
    use super::super::gemm::Epilogue;
    use super::super::tests::{conv_case, values, AMX_CONV_SHAPES, AMX_GEMM_SHAPES};
    use super::*;

    /// The emulator, or `None` after saying why the test is skipped.
    fn emulator_or_skip(what: &str) -> Option<PathBuf> {
        emulator()
            .inspect_err(|why| println!("SKIPPED: {what} on an emulated AMX CPU: {why}"))
            .ok()
    }

    /// The emulator, in this test's own child process ([`alone`]): `None` after saying why the
    /// test is skipped, and in the parent once the child ran and passed.
    fn emulator_alone(what: &str, name: &str) -> Option<PathBuf> {
        let bochs = emulator_or_skip(what)?;
        alone(name).then_some(bochs)
    }

    #[test]
    fn a_function_runs_in_the_guest_and_its_outputs_come_back() {
        let Some(bochs) = emulator_alone(
            "a function",
            "model::cpu::bochs::tests::a_function_runs_in_the_guest_and_its_outputs_come_back",
        ) else {
            return;
        };
        let input: Vec<u64> = (1..=100).collect();
        let mut output = [0u64; 4];
        let out = output.as_mut_ptr();
        let mut guest = || {
            let sum: u64 = input.iter().sum();
            // SAFETY: `output` outlives the run; this write happens in the guest's copy of it
            // only (so `output` here stays zeros).
            unsafe { *out.add(2) = sum * 3 };
            sum
        };
        // SAFETY: four u64 are 32 plain bytes.
        let bytes = unsafe { std::slice::from_raw_parts(out.cast::<u8>(), 32) };
        let outcome = run(&bochs, &mut guest, &[bytes]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(outcome.returned, 5050);
        assert!(outcome.syscalls.is_empty(), "{:?}", outcome.syscalls);
        let got: Vec<u64> = outcome.outputs[0]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        // Written in the guest only: here, `output` is still zeros.
        assert_eq!(got, [0, 0, 15150, 0]);
        assert_eq!(output, [0; 4]);
    }

    fn as_bytes(x: &[f32]) -> &[u8] {
        // SAFETY: any f32 is 4 plain bytes.
        unsafe { std::slice::from_raw_parts(x.as_ptr().cast(), 4 * x.len()) }
    }

    fn floats(bytes: &[u8]) -> Vec<f32> {
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect()
    }

    /// Where two results differ in their bits (NaN padding included), as a message.
    fn first_difference(got: &[f32], want: &[f32]) -> Option<String> {
        assert_eq!(got.len(), want.len(), "lengths");
        let at = got
            .iter()
            .zip(want)
            .position(|(g, w)| g.to_bits() != w.to_bits())?;
        Some(format!("at {at}: {} against {}", got[at], want[at]))
    }

    #[test]
    fn amx_products_on_an_emulated_cpu_equal_the_tile_model() {
        let Some(bochs) = emulator_or_skip("the AMX product") else {
            return;
        };
        if !alone("model::cpu::bochs::tests::amx_products_on_an_emulated_cpu_equal_the_tile_model")
        {
            return;
        }
        prepare_thread(32 << 20);
        for &(m, k, n, first_panel) in &AMX_GEMM_SHAPES {
            let a = values(m * k, 1);
            let bm = values(k * n, 2);
            let bias = values(n.div_ceil(16) * 16, 3);
            let packed = PackedBf16::pack(k, n, |r, col| bm[r * n + col]);
            let lda = k.div_ceil(2) * 2 + 6;
            let mut a16 = vec![0u16; m * lda];
            for i in 0..m {
                for p in 0..k {
                    a16[i * lda + p] = bf16::to_bf16(a[i * k + p]);
                }
            }
            let ldc = n - first_panel * 16 + 3;
            let epi = Epilogue {
                bias: Some(&bias),
                relu: true,
            };
            let panels = first_panel..packed.panels();
            let mut want = vec![f32::NAN; m * ldc];
            bf16::gemm_tiles(
                &mut Model::default(),
                m,
                &a16,
                lda,
                &packed,
                panels.clone(),
                &mut want,
                ldc,
                epi,
            );
            let mut got = vec![f32::NAN; m * ldc];
            let out = got.as_mut_ptr();
            let mut guest = || {
                // SAFETY: `got` outlives the run; these writes happen in the guest's copy of
                // it only.
                let c = unsafe { std::slice::from_raw_parts_mut(out, m * ldc) };
                // SAFETY: the emulated CPU has AMX, and the ROM enabled the tile state.
                let mut tiles = unsafe { Hardware::here() };
                bf16::gemm_tiles(
                    &mut tiles,
                    m,
                    &a16,
                    lda,
                    &packed,
                    panels.clone(),
                    c,
                    ldc,
                    epi,
                );
                0
            };
            let outcome = run(&bochs, &mut guest, &[as_bytes(&got)])
                .unwrap_or_else(|e| panic!("{m}x{k}x{n}: {e}"));
            assert_eq!(outcome.returned, 0, "{m}x{k}x{n}: the guest panicked");
            assert!(outcome.syscalls.is_empty(), "{:?}", outcome.syscalls);
            let got = floats(&outcome.outputs[0]);
            if let Some(d) = first_difference(&got, &want) {
                panic!("{m}x{k}x{n}: AMX against the model {d}");
            }
        }
        // The self-check the server runs before it uses AMX, on the emulated tiles.
        let mut guest = || {
            let check = bf16::agrees_on_an_exact_product(|m, a, lda, b, c, ldc| {
                // SAFETY: as above.
                let mut tiles = unsafe { Hardware::here() };
                bf16::gemm_tiles(
                    &mut tiles,
                    m,
                    a,
                    lda,
                    b,
                    0..b.panels(),
                    c,
                    ldc,
                    Epilogue::NONE,
                )
            });
            u64::from(check.is_err())
        };
        let outcome = run(&bochs, &mut guest, &[]).unwrap_or_else(|e| panic!("self-check: {e}"));
        assert_eq!(
            outcome.returned, 0,
            "the AMX self-check failed on the emulated CPU"
        );
        assert!(outcome.syscalls.is_empty(), "{:?}", outcome.syscalls);
    }

    #[test]
    fn the_amx_direct_conv_on_an_emulated_cpu_equals_the_tile_model() {
        let Some(bochs) = emulator_alone("the AMX direct conv", "model::cpu::bochs::tests::the_amx_direct_conv_on_an_emulated_cpu_equals_the_tile_model") else {
            return;
        };
        prepare_thread(32 << 20);
        // One thread: the conv's rayon calls run inline on it, in the guest too.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("a one-thread pool");
        pool.install(|| {
            for &(n, ci, co, h, w) in &AMX_CONV_SHAPES {
                let (x, wv, bv) = conv_case((n, ci, co, h, w), 3, 21);
                let op = DirectConvBf16::new(&wv, &bv, co, ci);
                let nhwc: Vec<f32> = x
                    .permute((0, 2, 3, 1))
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1())
                    .expect("the input in NHWC");
                // Natively on the model first: the result to match, and the allocations the
                // guest's run makes again.
                let want = op.forward_tiles(Model::default, &nhwc, [n, h, w]);
                let mut got = vec![f32::NAN; want.len()];
                let out = got.as_mut_ptr();
                let mut guest = || {
                    // SAFETY: the emulated CPU has AMX, and the ROM enabled the tile state.
                    let make = || unsafe { Hardware::here() };
                    let result = op.forward_tiles(make, &nhwc, [n, h, w]);
                    // SAFETY: `got` outlives the run; written in the guest's copy only.
                    let c = unsafe { std::slice::from_raw_parts_mut(out, result.len()) };
                    c.copy_from_slice(&result);
                    0
                };
                let shape = format!("{n}x{ci}->{co} {h}x{w}");
                let outcome = run(&bochs, &mut guest, &[as_bytes(&got)])
                    .unwrap_or_else(|e| panic!("{shape}: {e}"));
                assert_eq!(outcome.returned, 0, "{shape}: the guest panicked");
                assert!(outcome.syscalls.is_empty(), "{:?}", outcome.syscalls);
                let got = floats(&outcome.outputs[0]);
                if let Some(d) = first_difference(&got, &want) {
                    panic!("{shape}: AMX against the model {d}");
                }
            }
        });
    }

    #[test]
    fn on_an_emulated_amx_cpu_detection_finds_amx_and_its_self_check_passes() {
        let Some(bochs) = emulator_alone("AMX detection", "model::cpu::bochs::tests::on_an_emulated_amx_cpu_detection_finds_amx_and_its_self_check_passes") else {
            return;
        };
        prepare_thread(32 << 20);
        // In the guest, the first calls in this process: CPUID, XCR0, the palette, the tile
        // permission from the kernel (the ROM's answer), then the self-check on the tiles.
        let mut guest = || {
            let available = amx::available();
            let avx512 = bf16::avx512_bf16();
            let kernel = Kernel::detect();
            u64::from(available) | u64::from(avx512) << 1 | (kernel as u64) << 2
        };
        let outcome = run(&bochs, &mut guest, &[]).unwrap_or_else(|e| panic!("{e}"));
        // The tile permission was granted, and nothing else asked for.
        assert!(outcome.syscalls.is_empty(), "{:?}", outcome.syscalls);
        let r = outcome.returned;
        assert_ne!(r, u64::MAX, "the guest panicked");
        assert_eq!(
            r & 1,
            1,
            "amx::available() is false on the emulated AMX CPU"
        );
        // Nothing here detected CPU features before the copy, so the guest did, on its own CPU.
        assert_eq!(
            r >> 1 & 1,
            1,
            "the guest saw no AVX512-BF16: CPU features were detected here before the copy"
        );
        assert_eq!(
            r >> 2,
            Kernel::Amx as u64,
            "Kernel::detect() on the emulated AMX CPU"
        );
        // Here, natively, nothing of that was run: this CPU is not asked.
    }

    /// Where the OS withholds the tile state, detection declines AMX and bf16 runs on
    /// AVX512-BF16: a kernel that did not enable it in XCR0 (before Linux 5.16), and one that
    /// refuses this process the tile data (a sandbox).
    #[test]
    fn on_an_emulated_amx_cpu_detection_declines_amx_when_the_os_withholds_it() {
        let Some(bochs) = emulator_alone(
            "AMX detection where the OS withholds AMX",
            "model::cpu::bochs::tests::on_an_emulated_amx_cpu_detection_declines_amx_when_the_os_withholds_it",
        ) else {
            return;
        };
        prepare_thread(32 << 20);
        // Each guest starts from the same copy, detection's caches empty in each.
        for (xcr0, tile_permission, case) in [
            (0xe7, true, "no tile state in XCR0"),
            (0x600e7, false, "the tile permission refused"),
        ] {
            let mut guest = || u64::from(amx::available()) | (Kernel::detect() as u64) << 2;
            let machine = Machine {
                xcr0,
                tile_permission,
                ..Machine::default()
            };
            let outcome =
                run_on(machine, &bochs, &mut guest, &[]).unwrap_or_else(|e| panic!("{case}: {e}"));
            assert!(
                outcome.syscalls.is_empty(),
                "{case}: {:?}",
                outcome.syscalls
            );
            assert_eq!(outcome.returned & 1, 0, "{case}: amx::available()");
            assert_eq!(
                outcome.returned >> 2,
                Kernel::Avx512 as u64,
                "{case}: Kernel::detect()"
            );
        }
    }

    /// The whole fixture model (DiracNet-18 at width 16) with `--dtype bf16`, built and run in
    /// the guest, where detection picks AMX: the configuration a Xeon with AMX runs (every
    /// 3×3 conv direct on the tiles where its channels allow). Its logits against this CPU's
    /// f32 ones: within 1.5 % of the largest |logit|, the same top-1 (issue 13's bound).
    #[test]
    fn the_fixture_model_in_bf16_on_an_emulated_amx_cpu_stays_near_f32() {
        use crate::model::backend::{Backend, ConvImpl, Precision};
        use crate::model::net::DiracNet;
        use candle_core::{Device, Tensor};
        let Some(bochs) = emulator_alone("the fixture model in bf16", "model::cpu::bochs::tests::the_fixture_model_in_bf16_on_an_emulated_amx_cpu_stays_near_f32") else {
            return;
        };
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let tensors: std::collections::BTreeMap<String, Tensor> = candle_core::safetensors::load(
            fixtures.join("models/dn18w16.safetensors"),
            &Device::Cpu,
        )
        .expect("the fixture model")
        .into_iter()
        .collect();
        let inputs = crate::npy::read_f32(&fixtures.join("reference/inputs.npy")).expect("inputs");
        let images = inputs.shape[0];
        let x = Tensor::from_vec(inputs.data.clone(), inputs.shape.clone(), &Device::Cpu)
            .expect("the input");
        let classes = tensors["fc.bias"].dims()[0];
        let mut got = vec![f32::NAN; images * classes];
        let mut described = [0u8; 128];
        // Addresses, to cross into the pool's thread.
        let (out, text) = (got.as_mut_ptr() as usize, described.as_mut_ptr() as usize);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("a one-thread pool");
        let outcome = pool
            .install(|| {
                prepare_thread(48 << 20);
                let mut guest = || {
                    let kernel = Kernel::detect();
                    let backend =
                        Backend::new(Device::Cpu, ConvImpl::Fast, Precision::Bf16).expect("bf16");
                    // What `/info` would say.
                    let description = backend.conv_description();
                    let len = description.len().min(128);
                    // SAFETY: `described` outlives the run; written in the guest's copy only.
                    unsafe { std::slice::from_raw_parts_mut(text as *mut u8, len) }
                        .copy_from_slice(&description.as_bytes()[..len]);
                    let net = DiracNet::from_tensors(&tensors, &backend).expect("the bf16 net");
                    let logits = net
                        .forward(&x)
                        .and_then(|l| Ok(l.flatten_all()?.to_vec1::<f32>()?))
                        .expect("bf16 logits");
                    // SAFETY: `got` outlives the run; written in the guest's copy only.
                    let c =
                        unsafe { std::slice::from_raw_parts_mut(out as *mut f32, logits.len()) };
                    c.copy_from_slice(&logits);
                    kernel as u64 | u64::from(bf16::avx512_bf16()) << 8
                };
                let outputs = [as_bytes(&got), &described[..]];
                let limit = std::time::Duration::from_secs(600);
                run_on(
                    Machine {
                        limit,
                        ..Machine::default()
                    },
                    &bochs,
                    &mut guest,
                    &outputs,
                )
            })
            .unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(outcome.returned, u64::MAX, "the guest panicked");
        for call in &outcome.syscalls {
            println!("answered -ENOSYS in the guest: {call}");
        }
        // Nothing here detected CPU features before the copy, so the guest did, on its own CPU.
        assert_eq!(
            outcome.returned >> 8,
            1,
            "the guest saw no AVX512-BF16: CPU features were detected here before the copy"
        );
        assert_eq!(
            outcome.returned & 0xff,
            Kernel::Amx as u64,
            "detection in the guest did not pick AMX"
        );
        let described = String::from_utf8_lossy(&outcome.outputs[1]);
        assert_eq!(
            described.trim_end_matches('\0'),
            "fast (direct only, bf16 products, f32 sums, amx_bf16)"
        );
        let bf16s = floats(&outcome.outputs[0]);
        // The reference, after the guest ran: detection here would have been copied into it.
        let f32s = {
            let backend = Backend::new(Device::Cpu, ConvImpl::Fast, Precision::F32).expect("f32");
            let net = DiracNet::from_tensors(&tensors, &backend).expect("the f32 net");
            net.forward(&x)
                .and_then(|l| Ok(l.flatten_all()?.to_vec1::<f32>()?))
                .expect("f32 logits")
        };
        let max_logit = f32s.iter().fold(0f32, |m, v| m.max(v.abs()));
        let worst = f32s
            .iter()
            .zip(&bf16s)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!("AMX bf16 vs f32: max |Δlogit| = {worst}, max |logit| = {max_logit}");
        let top = |row: &[f32]| {
            (0..row.len())
                .max_by(|&i, &j| row[i].total_cmp(&row[j]))
                .expect("classes")
        };
        for (i, (a, b)) in f32s.chunks(classes).zip(bf16s.chunks(classes)).enumerate() {
            assert_eq!(top(a), top(b), "image {i}: top-1 differs");
        }
        assert!(worst <= 0.015 * max_logit, "{worst} against {max_logit}");
        assert!(worst > 0.0, "bf16 changed nothing: not the bf16 path?");
    }

    /// DiracNet-18 and -34 at full width, random weights (as `bench --model random:N`), one
    /// fixture crop, in bf16 on the emulated AMX CPU against f32 here: the accuracy of what a
    /// Xeon with AMX runs at full size (every 3×3 conv direct on the tiles). About a gigabyte
    /// of memory and a minute; run by hand: `cargo test --release -- --ignored full_width`.
    #[test]
    #[ignore = "a gigabyte and a minute in the emulator; run by hand"]
    fn full_width_models_in_bf16_on_an_emulated_amx_cpu_stay_near_f32() {
        use crate::model::backend::{Backend, ConvImpl, Precision};
        use crate::model::net::DiracNet;
        use crate::model::Architecture;
        use candle_core::{Device, Tensor};
        let Some(bochs) = emulator_alone(
            "full-width models in bf16",
            "model::cpu::bochs::tests::full_width_models_in_bf16_on_an_emulated_amx_cpu_stay_near_f32",
        ) else {
            return;
        };
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let inputs = crate::npy::read_f32(&fixtures.join("reference/inputs.npy")).expect("inputs");
        let per_image: usize = inputs.shape[1..].iter().product();
        let x = Tensor::from_vec(
            inputs.data[..per_image].to_vec(),
            (1, 3, 224, 224),
            &Device::Cpu,
        )
        .expect("the input");
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("a one-thread pool");
        // Every guest first: CPU features detected here before a copy would be copied into it.
        let mut runs = Vec::new();
        for depth in [18, 34] {
            let arch = Architecture::imagenet(depth, 1000).expect("an ImageNet DiracNet");
            let tensors: std::collections::BTreeMap<String, Tensor> = arch
                .random_weights(42)
                .into_iter()
                .map(|(k, t)| {
                    let t = Tensor::from_vec(t.data, t.shape, &Device::Cpu).expect("a tensor");
                    (k, t)
                })
                .collect();
            let mut got = vec![f32::NAN; arch.classes];
            let out = got.as_mut_ptr() as usize;
            let started = std::time::Instant::now();
            let outcome = pool
                .install(|| {
                    prepare_thread(768 << 20);
                    let mut guest = || {
                        let kernel = Kernel::detect();
                        let backend = Backend::new(Device::Cpu, ConvImpl::Fast, Precision::Bf16)
                            .expect("bf16");
                        let net = DiracNet::from_tensors(&tensors, &backend).expect("the bf16 net");
                        let logits = net
                            .forward(&x)
                            .and_then(|l| Ok(l.flatten_all()?.to_vec1::<f32>()?))
                            .expect("bf16 logits");
                        // SAFETY: `got` outlives the run; written in the guest's copy only.
                        unsafe { std::slice::from_raw_parts_mut(out as *mut f32, logits.len()) }
                            .copy_from_slice(&logits);
                        kernel as u64
                    };
                    let limit = std::time::Duration::from_secs(900);
                    let machine = Machine {
                        limit,
                        ..Machine::default()
                    };
                    run_on(machine, &bochs, &mut guest, &[as_bytes(&got)])
                })
                .unwrap_or_else(|e| panic!("DN{depth}: {e}"));
            let seconds = started.elapsed().as_secs_f64();
            assert_eq!(
                outcome.returned,
                Kernel::Amx as u64,
                "DN{depth}: not on AMX"
            );
            runs.push((depth, tensors, floats(&outcome.outputs[0]), seconds));
        }
        let logits = |tensors: &std::collections::BTreeMap<String, Tensor>, precision| {
            let backend = Backend::new(Device::Cpu, ConvImpl::Fast, precision).expect("a backend");
            let net = DiracNet::from_tensors(tensors, &backend).expect("the net");
            let logits = net
                .forward(&x)
                .and_then(|l| Ok(l.flatten_all()?.to_vec1::<f32>()?))
                .expect("logits");
            (logits, backend.conv_description())
        };
        let worst = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max)
        };
        let top = |row: &[f32]| (0..row.len()).max_by(|&i, &j| row[i].total_cmp(&row[j]));
        for (depth, tensors, bf16s, seconds) in runs {
            let (f32s, _) = logits(&tensors, Precision::F32);
            let max_logit = f32s.iter().fold(0f32, |m, v| m.max(v.abs()));
            let amx = worst(&f32s, &bf16s);
            // For comparison, this CPU's bf16 on the same weights and image.
            let (here, description) = logits(&tensors, Precision::Bf16);
            println!(
                "DN{depth} AMX bf16 vs f32: max |Δlogit| = {amx} = {:.2} % of max |logit| \
                 {max_logit}, top-1 {:?} vs {:?} ({seconds:.1} s in the emulator); bf16 here \
                 ({description}): {:.2} %",
                100.0 * amx / max_logit,
                top(&bf16s),
                top(&f32s),
                100.0 * worst(&f32s, &here) / max_logit,
            );
            assert_eq!(top(&bf16s), top(&f32s), "DN{depth}: top-1 differs");
            assert!(
                amx <= 0.015 * max_logit,
                "DN{depth}: {amx} against {max_logit}"
            );
        }
    }
}
