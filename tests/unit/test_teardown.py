"""teardown: leaving the job at the end of the program."""


def test_the_exit_agreement_leaves_after_its_patience(capsys):
    """A peer that never agrees (it left without a word that ULFM passed on)
    does not hang a rank at exit: it says so and leaves."""
    from ulfmpy import teardown

    class Never:
        def Test(self):
            return False

    class Comm:
        def Iagree(self, flag):
            return Never()

        def Get_rank(self):
            return 2

    teardown.agree_at_exit(Comm(), patience=0.05)
    assert "rank 2: the other ranks did not reach the end of the program within 0.05 s" \
        in capsys.readouterr().err

    class Done(Never):
        def Test(self):
            return True

    Comm.Iagree = lambda self, flag: Done()
    teardown.agree_at_exit(Comm(), patience=0.05)
    assert capsys.readouterr().err == ""
