/* A guest that never reports: the host's timeout must interrupt it. */
#include "kvmtest_layout.h"
	.intel_syntax noprefix
	.code64
	.text
	.globl l1_main
l1_main:
	.globl spin_loop
spin_loop:
	pause
	jmp spin_loop
