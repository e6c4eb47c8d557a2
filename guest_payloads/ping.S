/* params.count PING round trips, then DONE: the per-exit benchmark. */
#include "kvmtest_layout.h"
#include "svm.h"
	.intel_syntax noprefix
	.code64
	.text
	.globl l1_main
l1_main:
	mov rbx, [P_COUNT]
	test rbx, rbx
	jz 2f
1:	UCALL0(UCALL_PING)
	dec rbx
	jnz 1b
2:	ret
