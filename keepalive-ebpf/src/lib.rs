#![no_std]
// Empty: this lets cargo rebuild the program when its sources change (as aya-template does).
