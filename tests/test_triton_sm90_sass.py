"""eegfast.testing.triton_sm90.loop_mixes on a hand-written nvdisasm listing (no ptxas needed):
which branches close loops, what each body holds, predicates and opcode suffixes."""

from eegfast.testing.triton_sm90 import loop_mixes

LISTING = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/              @!P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0020*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0030*/                   MUFU.EX2 R3, R2 ;
        /*0040*/              @P1 FMNMX R4, R3, R4, !PT ;
.L_x_2:
        /*0050*/                   FADD R5, R5, R3 ;
        /*0060*/                   FADD R6, R6, R3 ;
        /*0070*/              @!P2 BRA `(.L_x_2) ;
        /*0080*/                   LDL R7, [R1+0x8] ;
        /*0090*/               @P3 BRA `(.L_x_1) ;
.L_x_0:
        /*00a0*/                   STG.E [R8.64], R5 ;
        /*00b0*/                   EXIT ;
.L_x_3:
        /*00c0*/                   BRA `(.L_x_3);
"""


def test_loop_mixes_reads_back_branches_as_loops():
    loops = loop_mixes(LISTING)
    # program order of the closing branches: the inner loop, then the outer one; neither the
    # forward branch to .L_x_0 nor the self-branch kernels end with is a loop body
    assert [loop.instructions for loop in loops] == [3, 8]
    inner, outer = loops
    assert inner.opcodes == {"FADD": 2, "BRA": 1}
    assert outer.count("HGMMA") == 1 and outer.count("MUFU") == 1
    assert outer.count("FMNMX") == 1  # predicated instructions count under their opcode
    assert outer.count("LDL", "STL") == 1 and inner.count("LDL", "STL") == 0
    assert outer.count("FADD") == 2 and outer.count("STG") == 0
