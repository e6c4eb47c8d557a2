/* The event log (kvmtest/eventlog.py): included by the payloads that record
 * in which order markers and events happened.  Defines log_event and the
 * MARK macro; 64-bit code. */

/* log_event(kind=rdi, value=rsi): append one entry.  Preserves every
 * register and RFLAGS.IF (interrupts are held off while it writes). */
	.code64
	.globl log_event
log_event:
	pushfq
	cli
	push rax
	mov rax, [LOG_GPA]
	cmp rax, LOG_MAX
	jae 1f
	shl rax, 4
	mov [LOG_GPA + 8 + rax], rdi
	mov [LOG_GPA + 16 + rax], rsi
	shr rax, 4
	inc rax
	mov [LOG_GPA], rax
1:	pop rax
	popfq
	ret

/* MARK(name): a global label `name` whose address goes into the log, so an
 * event taken right before it reads "intr@name" and the marker "mark@name". */
#define MARK(name) \
	.globl name; name: \
	push rdi; push rsi; \
	mov edi, LOG_MARK; lea rsi, [rip + name]; \
	call log_event; \
	pop rsi; pop rdi

/* set_gate(vector=rdi, handler=rsi): a 64-bit interrupt gate (DPL 0) in the
 * shared IDT at IDT_GPA.  Clobbers rax, rcx, rdx. */
	.globl set_gate
set_gate:
	mov rax, rsi
	and eax, 0xffff
	mov rcx, SEL_CODE64 << 16 | 0x8e << 40
	or rax, rcx
	mov rcx, rsi
	shr rcx, 16
	and ecx, 0xffff
	shl rcx, 48
	or rax, rcx
	mov rdx, rdi
	shl rdx, 4
	mov [IDT_GPA + rdx], rax
	mov rax, rsi
	shr rax, 32
	mov [IDT_GPA + 8 + rdx], rax
	ret
