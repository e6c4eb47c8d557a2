"""kvmtest: conformance tests for Linux KVM's nested SVM handling of failed VMRUNs."""

__version__ = "0.1.0"
