/*
 * bench_ref: the C reference for `kvmtest bench`.
 *
 * It issues the same ioctl sequence as kvmtest/bench.py, on the same guest:
 * Python writes the guest (memory chunks, CPUID, register and segment state,
 * ucall port/commands) into a "spec" file, both sides load it, and only the
 * timed loops differ in language.
 *
 *   bench_ref SPEC lifecycle N   -> N x (CREATE_VM .. run to DONE .. close)
 *   bench_ref SPEC exits N       -> one VM, run the payload (N PING ucalls)
 *
 * Prints "<mode> <iterations> <total ns> <exits>", then for lifecycle one
 * line with each iteration's ns (the caller takes medians: this host is noisy).
 *
 * Spec file: records of (u32 tag, u32 len, len bytes), little-endian.
 * Struct records are raw bytes of the <linux/kvm.h> structs, valid because
 * both sides are compiled against the same header.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <linux/kvm.h>

enum {
	TAG_MEM_SIZE = 1,	/* u64 */
	TAG_CHUNK = 2,		/* u64 gpa, bytes */
	TAG_REGS = 3,		/* struct kvm_regs */
	TAG_SREGS = 4,		/* struct kvm_sregs: template for segments/CRs/EFER */
	TAG_CPUID = 5,		/* struct kvm_cpuid2 + entries */
	TAG_UCALL = 6,		/* u32 port, u32 done, u32 ping */
};

struct chunk {
	uint64_t gpa;
	uint32_t len;
	const uint8_t *data;
};

static struct spec {
	uint64_t mem_size;
	struct chunk chunks[64];
	int nchunks;
	struct kvm_regs regs;
	struct kvm_sregs sregs;
	struct kvm_cpuid2 *cpuid;
	uint32_t port, done, ping;
} spec;

static int kvm_fd;
static long run_size;

static void die(const char *what)
{
	fprintf(stderr, "bench_ref: %s: %s\n", what, strerror(errno));
	exit(2);
}

static void fail(const char *msg)
{
	fprintf(stderr, "bench_ref: %s\n", msg);
	exit(2);
}

static void load_spec(const char *path)
{
	FILE *f = fopen(path, "rb");
	static uint8_t *buf;
	long n, off = 0;

	if (!f)
		die(path);
	fseek(f, 0, SEEK_END);
	n = ftell(f);
	rewind(f);
	buf = malloc(n);
	if (fread(buf, 1, n, f) != (size_t)n)
		die("read spec");
	fclose(f);
	while (off + 8 <= n) {
		uint32_t tag, len;
		const uint8_t *p;

		memcpy(&tag, buf + off, 4);
		memcpy(&len, buf + off + 4, 4);
		p = buf + off + 8;
		off += 8 + len;
		switch (tag) {
		case TAG_MEM_SIZE:
			memcpy(&spec.mem_size, p, 8);
			break;
		case TAG_CHUNK:
			if (spec.nchunks == 64)
				fail("too many chunks");
			memcpy(&spec.chunks[spec.nchunks].gpa, p, 8);
			spec.chunks[spec.nchunks].len = len - 8;
			spec.chunks[spec.nchunks].data = p + 8;
			spec.nchunks++;
			break;
		case TAG_REGS:
			if (len != sizeof(spec.regs))
				fail("kvm_regs size mismatch");
			memcpy(&spec.regs, p, len);
			break;
		case TAG_SREGS:
			if (len != sizeof(spec.sregs))
				fail("kvm_sregs size mismatch");
			memcpy(&spec.sregs, p, len);
			break;
		case TAG_CPUID:
			spec.cpuid = (struct kvm_cpuid2 *)p;
			break;
		case TAG_UCALL:
			memcpy(&spec.port, p, 4);
			memcpy(&spec.done, p + 4, 4);
			memcpy(&spec.ping, p + 8, 4);
			break;
		}
	}
	if (!spec.mem_size || !spec.cpuid || !spec.port)
		fail("incomplete spec");
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

struct vm {
	int vm_fd, vcpu_fd;
	uint8_t *mem;
	struct kvm_run *run;
};

/* Mirrors kvmtest.bench.setup(): the order and the ioctls are the same. */
static void vm_setup(struct vm *vm)
{
	struct kvm_userspace_memory_region region;
	struct kvm_sregs sregs;
	int i;

	vm->vm_fd = ioctl(kvm_fd, KVM_CREATE_VM, 0);
	if (vm->vm_fd < 0)
		die("KVM_CREATE_VM");
	vm->mem = mmap(NULL, spec.mem_size, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (vm->mem == MAP_FAILED)
		die("mmap guest memory");
	memset(&region, 0, sizeof(region));
	region.slot = 0;
	region.guest_phys_addr = 0;
	region.memory_size = spec.mem_size;
	region.userspace_addr = (uintptr_t)vm->mem;
	if (ioctl(vm->vm_fd, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		die("KVM_SET_USER_MEMORY_REGION");
	vm->vcpu_fd = ioctl(vm->vm_fd, KVM_CREATE_VCPU, 0);
	if (vm->vcpu_fd < 0)
		die("KVM_CREATE_VCPU");
	vm->run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vm->vcpu_fd, 0);
	if (vm->run == MAP_FAILED)
		die("mmap kvm_run");
	if (ioctl(vm->vcpu_fd, KVM_SET_CPUID2, spec.cpuid) < 0)
		die("KVM_SET_CPUID2");
	if (ioctl(vm->vcpu_fd, KVM_GET_SREGS, &sregs) < 0)
		die("KVM_GET_SREGS");
	sregs.cs = spec.sregs.cs;
	sregs.ds = spec.sregs.ds;
	sregs.es = spec.sregs.es;
	sregs.fs = spec.sregs.fs;
	sregs.gs = spec.sregs.gs;
	sregs.ss = spec.sregs.ss;
	sregs.tr = spec.sregs.tr;
	sregs.ldt = spec.sregs.ldt;
	sregs.gdt = spec.sregs.gdt;
	sregs.idt = spec.sregs.idt;
	sregs.cr0 = spec.sregs.cr0;
	sregs.cr3 = spec.sregs.cr3;
	sregs.cr4 = spec.sregs.cr4;
	sregs.efer = spec.sregs.efer;
	if (ioctl(vm->vcpu_fd, KVM_SET_SREGS, &sregs) < 0)
		die("KVM_SET_SREGS");
	if (ioctl(vm->vcpu_fd, KVM_SET_REGS, &spec.regs) < 0)
		die("KVM_SET_REGS");
	for (i = 0; i < spec.nchunks; i++)
		memcpy(vm->mem + spec.chunks[i].gpa, spec.chunks[i].data, spec.chunks[i].len);
}

/* Run to the DONE ucall; every other exit must be a PING ucall. */
static long vm_run_to_done(struct vm *vm)
{
	long exits = 0;

	for (;;) {
		struct kvm_run *run = vm->run;
		uint32_t cmd = 0;

		if (ioctl(vm->vcpu_fd, KVM_RUN, 0) < 0)
			die("KVM_RUN");
		exits++;
		if (run->exit_reason != KVM_EXIT_IO || run->io.port != spec.port) {
			fprintf(stderr, "bench_ref: unexpected exit %u\n", run->exit_reason);
			exit(2);
		}
		memcpy(&cmd, (uint8_t *)run + run->io.data_offset, run->io.size);
		if (cmd == spec.done)
			return exits;
		if (cmd != spec.ping) {
			fprintf(stderr, "bench_ref: unexpected ucall %u\n", cmd);
			exit(2);
		}
	}
}

static void vm_destroy(struct vm *vm)
{
	munmap(vm->run, run_size);
	close(vm->vcpu_fd);
	close(vm->vm_fd);
	munmap(vm->mem, spec.mem_size);
}

int main(int argc, char **argv)
{
	uint64_t t0, t1, *samples = NULL;
	long n, i, exits = 0;
	struct vm vm;

	if (argc != 4)
		fail("usage: bench_ref SPEC lifecycle|exits N");
	load_spec(argv[1]);
	n = atol(argv[3]);
	kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm_fd < 0)
		die("/dev/kvm");
	run_size = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (run_size < 0)
		die("KVM_GET_VCPU_MMAP_SIZE");

	if (!strcmp(argv[2], "lifecycle")) {
		samples = calloc(n, sizeof(*samples));
		if (!samples)
			die("calloc");
		t0 = now_ns();
		for (i = 0; i < n; i++) {
			uint64_t s0 = now_ns();

			vm_setup(&vm);
			exits += vm_run_to_done(&vm);
			vm_destroy(&vm);
			samples[i] = now_ns() - s0;
		}
		t1 = now_ns();
	} else if (!strcmp(argv[2], "exits")) {
		vm_setup(&vm);
		t0 = now_ns();
		exits = vm_run_to_done(&vm);
		t1 = now_ns();
		vm_destroy(&vm);
	} else {
		fail("mode must be lifecycle or exits");
	}
	printf("%s %ld %llu %ld\n", argv[2], n, (unsigned long long)(t1 - t0), exits);
	for (i = 0; samples && i < n; i++)
		printf("%llu%c", (unsigned long long)samples[i], i + 1 < n ? ' ' : '\n');
	return 0;
}
