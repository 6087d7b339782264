"""aim_rt.engines"""
