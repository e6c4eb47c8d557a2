/* SVM instructions by encoding (APM vol. 3), so the payloads build with any
 * binutils.  Operands are implicit: rAX (VMRUN, VMLOAD, VMSAVE, INVLPGA,
 * SKINIT -> eAX) and ECX (INVLPGA ASID). */
#define VMRUN   .byte 0x0f, 0x01, 0xd8
#define VMMCALL .byte 0x0f, 0x01, 0xd9
#define VMLOAD  .byte 0x0f, 0x01, 0xda
#define VMSAVE  .byte 0x0f, 0x01, 0xdb
#define STGI    .byte 0x0f, 0x01, 0xdc
#define CLGI    .byte 0x0f, 0x01, 0xdd
#define SKINIT  .byte 0x0f, 0x01, 0xde
#define INVLPGA .byte 0x0f, 0x01, 0xdf

#define MSR_EFER        0xc0000080
#define MSR_VM_CR       0xc0010114
#define MSR_VM_HSAVE_PA 0xc0010117

/* ucall CMD with no arguments: clobbers rdi. */
#define UCALL0(cmd) mov edi, cmd; call ucall
